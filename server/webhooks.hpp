// Job webhooks: when a job is sent or has failed for good, squalld POSTs its public state to
// the one configured URL ([webhooks] url), signed with HMAC-SHA256 the way payment providers
// sign theirs. Durable: the store marks the webhook owed in the statement that finishes the
// job; this dispatcher, on the loop, claims owed webhooks through the StoreWorker, delivers
// them with http::Client and records each outcome, retrying with backoff up to max_attempts.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_set>

#include "squall/core/loop.hpp"
#include "squall/http/client.hpp"
#include "squall/jobs/store_worker.hpp"
#include "squall/metrics/metrics.hpp"

namespace squall::squalld {

// The signature header's value for `body` sent at `unix_seconds`:
// "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>" (Stripe's scheme).
std::string webhook_signature(std::string_view secret, std::int64_t unix_seconds,
                              std::string_view body);

// The wait before retry number `attempt` (1 = after the first failure): 1 s doubling up to an
// hour, then jittered into [half, full] by `unit` in [0, 1).
std::chrono::milliseconds webhook_backoff(int attempt, double unit);

struct WebhookSettings {
  std::string url;                            // [webhooks] url: the only URL ever used.
  std::string secret;                         // From [webhooks] secret_file.
  std::chrono::milliseconds timeout{10'000};  // [webhooks] timeout: one attempt.
  int max_attempts = 10;                      // [webhooks] max_attempts.
};

class WebhookDispatcher {
 public:
  // The JSON body of a job's event ("job.sent" or "job.failed", with its id); loop thread.
  using BodyOf = std::function<std::string(const jobs::Job& job, std::string_view event_id,
                                           std::string_view type)>;

  // Loop thread. Registers the squall_webhooks_* metrics in `registry`.
  WebhookDispatcher(Loop& loop, jobs::StoreWorker& store, WebhookSettings settings, BodyOf body_of,
                    metrics::Registry& registry);
  ~WebhookDispatcher();
  WebhookDispatcher(const WebhookDispatcher&) = delete;
  WebhookDispatcher& operator=(const WebhookDispatcher&) = delete;

  // Starts polling the store for owed webhooks (twice a second, and on poke()).
  void start();
  // Looks for owed webhooks now (e.g. a job just finished).
  void poke();
  // Stops polling and closes the client: deliveries in flight are cancelled and stay owed
  // (due at once) for the next start.
  void drain();

 private:
  void claim();
  void deliver(const jobs::Job& job);
  // Stores a delivery's outcome: delivered, given_up, owed (a retry due at due_ms) or none (a
  // cancelled delivery: released, due at once, its attempt not counted).
  void record(const std::string& id, jobs::WebhookState state, std::int64_t due_ms);

  Loop& loop_;
  jobs::StoreWorker& store_;
  WebhookSettings settings_;
  BodyOf body_of_;
  std::unique_ptr<http::Client> client_;       // Null once drained.
  Loop::TimerId poll_timer_ = 0;               // The periodic claim; 0 when stopped.
  bool claim_in_flight_ = false;               // A claim is queued on the store thread.
  bool draining_ = false;                      // drain() ran: claim nothing more.
  std::unordered_set<std::string> in_flight_;  // Job ids being delivered now.
  std::shared_ptr<bool> alive_;                // For callbacks from the store thread.
  metrics::Counter* delivered_ = nullptr;      // squall_webhooks_delivered_total.
  metrics::Counter* failed_ = nullptr;         // squall_webhooks_failed_total (given up).
  metrics::Counter* attempts_ = nullptr;       // squall_webhooks_attempts_total.
  metrics::Gauge* pending_ = nullptr;          // squall_webhooks_pending.
};

}  // namespace squall::squalld

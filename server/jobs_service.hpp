// Background email jobs in squalld: POST /email stores a job durably (group commit on the
// store thread) and answers 202 at once; the runner sends it on the thread pool; GET /jobs/{id}
// tells where it is.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "server/access.hpp"
#include "server/answers.hpp"
#include "server/config.hpp"
#include "server/webhooks.hpp"
#include "squall/core/loop.hpp"
#include "squall/core/rate_limit.hpp"
#include "squall/core/uv_handle.hpp"
#include "squall/http/router.hpp"
#include "squall/jobs/pg_store.hpp"
#include "squall/jobs/runner.hpp"
#include "squall/jobs/store_worker.hpp"
#include "squall/mail/email.hpp"
#include "squall/mail/smtp.hpp"
#include "squall/metrics/metrics.hpp"

namespace squall::squalld {

// When the next read of the store's statistics (counts by state, the oldest waiting job, each
// owner's share on a shared store) starts after one that took `took`. Those reads scan the
// waiting jobs: under a backlog of a few hundred thousand they take tens of milliseconds of a
// CPU, which a loop sharing it loses. So every 2 s, but spaced to at most half a percent of
// the time, and at least every 5 minutes.
inline std::chrono::milliseconds next_stats_read(std::chrono::nanoseconds took) noexcept {
  using std::chrono::milliseconds;
  constexpr milliseconds kEvery{2000}, kAtMost{300'000};
  constexpr int kSpacing = 200;  // Idle 200 times as long as the read took: 0.5%.
  const auto spaced = std::chrono::ceil<milliseconds>(took) * kSpacing;
  return std::clamp(spaced, kEvery, kAtMost);
}

// What the job routes read of a request. On the service's own loop (one worker, or worker 0)
// the views point into the request itself, which lives while the route runs the call there and
// then; for another loop, owned() copies them into one string the call keeps.
struct JobCall {
  std::shared_ptr<const AccessControl> access;  // Keeps caller.token alive.
  Caller caller;                                // The authenticated caller.
  std::string_view content_type;                // POST /email: Content-Type.
  std::string_view idempotency_key;             // POST /email: Idempotency-Key.
  std::string_view remote_address;              // POST /email: for [quota] address_*.
  std::string_view body;                        // POST /email: the JSON.
  std::string_view id;                          // GET /jobs/{id}.
  std::shared_ptr<const std::string> storage;   // The bytes of an owned() call's views.

  // A copy that owns its bytes (one allocation), for another loop.
  JobCall owned() const;
};

// One service for the whole process, on the primary loop: the store, the runner, the queue
// bounds and the rates are global; the routes of every worker loop hand their calls to it.
class JobsService {
 public:
  // Opens the job store (throws std::runtime_error naming the path) and registers metrics.
  // Call start() once the server is ready to run jobs.
  JobsService(Loop& loop, const Config& config, metrics::Registry& registry);
  ~JobsService();
  JobsService(const JobsService&) = delete;
  JobsService& operator=(const JobsService&) = delete;

  // Starts the runner: jobs left by an earlier run (queued, retrying, expired leases) go first.
  void start();
  // Adds POST /email and GET /jobs/{id} as [routes] enables them, behind `access`, for a
  // router of the worker loop whose desk is `desk` (it must outlive the router).
  void add_routes(http::Router& router, const Config& config,
                  std::shared_ptr<const AccessControl> access, AnswerDesk& desk);
  // New SMTP settings and job limits for attempts that start from now on.
  void reconfigure(const Config& config);
  // Stops accepting jobs and claiming; `done` runs when running sends finished. Jobs not sent
  // stay in the store for the next start.
  void drain(std::function<void()> done);
  // At the drain deadline: cuts the sends still running (within about a second); their jobs
  // go back to the queue untouched, and drain's `done` follows once that is recorded.
  void abort_sends();
  // "ok", or "failing" while the store refuses writes (full disk, a lock held too long, an
  // I/O error); it turns "ok" again by itself once a write succeeds. For /healthz.
  const char* store_status() const noexcept { return store_failing_ ? "failing" : "ok"; }

 private:
  // What one owner (an API token, or "" for anonymous callers) has waiting.
  struct Usage {
    std::int64_t jobs = 0;   // Accepted and not finished, plus inserts in flight.
    std::int64_t bytes = 0;  // Their payloads' bytes.
  };

  void accept_email(const JobCall& call, const Reply& reply);
  void report_job(const JobCall& call, const Reply& reply);
  // Reads the statistics on the pool, then arms stats_timer_ for the next read.
  void refresh_stats();
  void arm_stats_timer(std::chrono::milliseconds delay);  // Starts the next read after delay.
  // Once a second: the write probe (every second while the store fails, every
  // kProbeEvery seconds otherwise) and, when due, the retention purge.
  void housekeeping();
  void store_failed(const std::string& what, const std::string& error);
  void store_worked();
  // One retention round on the store thread; another follows while there is more to delete,
  // or free pages to give back and the last round gave some back (free_pages_before).
  void purge(std::int64_t finished_before_ms, bool vacuum_only_if_purged,
             std::int64_t free_pages_before);
  bool within_rate(const JobCall& call, const Reply& reply);
  // Sets the queue counts (pending_, usage_) to what the store holds plus this node's inserts
  // in flight: at start, and with each statistics read (next_stats_read) on a store shared with
  // other nodes.
  void adopt_store_usage(const std::vector<jobs::OwnerUsage>& stored);
  void reserve(const std::string& owner, std::int64_t bytes);
  void release(const std::string& owner, std::int64_t bytes);

  struct Settings;
  Loop& loop_;                                    // The loop the routes and runner live on.
  std::shared_ptr<const Settings> settings_;      // Replaced whole on reload.
  std::unique_ptr<jobs::StoreWorker> store_;      // The store's own thread.
  std::shared_ptr<jobs::JobStore> stats_reader_;  // A second connection, for counts on the pool.
  std::unique_ptr<jobs::JobRunner> runner_;       // Claims and performs due jobs.
  std::int64_t pending_ = 0;                      // Jobs stored and not finished, plus inserts
                                                  // in flight: the max_queued back-pressure.
  bool accepting_ = true;                         // False once draining.
  std::array<metrics::Gauge*, 5> by_state_gauges_{};  // squall_jobs{state=...}.
  std::int64_t oldest_pending_ms_ = 0;                // created_ms of the oldest waiting job.
  UvHandle<uv_timer_t> stats_timer_;                  // Refreshes by_state_; data -> this.
  bool stats_in_flight_ = false;                      // A stats query is queued.
  metrics::Histogram* send_seconds_ = nullptr;        // Attempt durations.
  std::shared_ptr<bool> alive_;                       // For callbacks from the store thread.
  // Retention, store health and shutdown.
  std::optional<jobs::StoreLock> store_lock_;       // Held for the process's life; see StoreLock.
  std::size_t running_pool_size_ = 0;               // The pool's size (fixed at start).
  bool store_failing_ = false;                      // The last write (insert or probe) failed.
  bool probe_in_flight_ = false;                    // A probe write is queued.
  bool purge_in_flight_ = false;                    // A purge round is running on the store thread.
  unsigned housekeeping_ticks_ = 0;                 // Seconds since start, for the slower tasks.
  std::int64_t next_purge_ms_ = 0;                  // When the next purge round is due.
  UvHandle<uv_timer_t> housekeeping_timer_;         // Runs housekeeping(); data -> this.
  std::uint64_t purged_total_ = 0;                  // Jobs deleted by retention.
  std::int64_t pending_bytes_ = 0;                  // Payload bytes of pending_ jobs.
  std::unordered_map<std::string, Usage> usage_;    // By owner: the per-client queue share.
  std::unique_ptr<KeyedRateLimiter> token_rate_;    // [quota] token_*: by token name.
  std::unique_ptr<KeyedRateLimiter> address_rate_;  // [quota] address_*: by client address.
  QuotaConfig rates_in_use_;                        // What the limiters were built with.
  mail::EmailRequestParser email_parser_;           // POST /email bodies, on the loop thread.
  std::unique_ptr<WebhookDispatcher> webhooks_;     // [webhooks] url set; destroyed first.
  // A PostgreSQL store shared with other nodes ([jobs] store = "postgresql://...").
  bool shared_store_ = false;                        // The store is PostgreSQL.
  std::string store_url_;                            // [jobs] store, for the notifier.
  std::unique_ptr<jobs::JobNotifier> notifier_;      // Wakes the runner on other nodes' inserts.
  std::unordered_map<std::string, Usage> inflight_;  // Inserts not answered yet, by owner.
};

}  // namespace squall::squalld

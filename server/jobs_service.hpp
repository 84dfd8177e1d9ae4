// Background email jobs in squalld: POST /email stores a job durably (group commit on the
// store thread) and answers 202 at once; the runner sends it on the thread pool; GET /jobs/{id}
// tells where it is.
#pragma once

#include <array>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>

#include "config/config.hpp"
#include "core/loop.hpp"
#include "core/rate_limit.hpp"
#include "http/router.hpp"
#include "jobs/runner.hpp"
#include "jobs/smtp.hpp"
#include "jobs/store_worker.hpp"
#include "metrics/metrics.hpp"
#include "server/access.hpp"

namespace squall::daemon {

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
  // Adds POST /email and GET /jobs/{id} as [routes] enables them, behind `access`.
  void add_routes(http::Router& router, const Config& config,
                  std::shared_ptr<const AccessControl> access);
  // New SMTP settings and job limits for attempts that start from now on.
  void reconfigure(const Config& config);
  // Stops accepting jobs and claiming; `done` runs when running sends finished. Jobs not sent
  // stay in the store for the next start.
  void drain(std::function<void()> done);

 private:
  // What one owner (an API token, or "" for anonymous callers) has waiting.
  struct Usage {
    std::int64_t jobs = 0;   // Accepted and not finished, plus inserts in flight.
    std::int64_t bytes = 0;  // Their payloads' bytes.
  };

  void accept_email(http::Request& request, const http::Responder& responder, const Caller& caller);
  void report_job(http::Request& request, const http::Responder& responder, const Caller& caller);
  void refresh_stats();
  bool within_rate(const http::Request& request, const Caller& caller,
                   const http::Responder& responder);
  void reserve(const std::string& owner, std::int64_t bytes);
  void release(const std::string& owner, std::int64_t bytes);
  // Keeps a Responder on the loop while the store thread works: callbacks from other threads
  // carry the ticket, never the Responder (whose copies change loop-owned reference counts).
  std::uint64_t park(const http::Responder& responder);
  // The parked Responder, removed from the table; an empty one if the ticket is unknown.
  http::Responder unpark(std::uint64_t ticket);

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
  uv_timer_t* stats_timer_ = nullptr;                 // Refreshes by_state_; freed on close.
  bool stats_in_flight_ = false;                      // A stats query is queued.
  metrics::Histogram* send_seconds_ = nullptr;        // Attempt durations.
  std::shared_ptr<bool> alive_;                       // For callbacks from the store thread.
  std::int64_t pending_bytes_ = 0;                    // Payload bytes of pending_ jobs.
  std::unordered_map<std::string, Usage> usage_;      // By owner: the per-client queue share.
  std::unique_ptr<KeyedRateLimiter> token_rate_;      // [quota] token_*: by token name.
  std::unique_ptr<KeyedRateLimiter> address_rate_;    // [quota] address_*: by client address.
  QuotaConfig rates_in_use_;                          // What the limiters were built with.
  std::unordered_map<std::uint64_t, http::Responder> parked_;  // Answers waiting for the store.
  std::uint64_t next_ticket_ = 1;                              // Never reused.
};

}  // namespace squall::daemon

// The daemon's built-in routes and the metrics they report.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "server/access.hpp"
#include "server/answers.hpp"
#include "server/config.hpp"
#include "squall/core/loop_lag.hpp"
#include "squall/http/router.hpp"
#include "squall/http/server.hpp"
#include "squall/log/log.hpp"
#include "squall/metrics/metrics.hpp"

namespace squall::squalld {

// Request and connection metrics. The families are registered once; each worker loop feeds
// them through its own Observer (request counts by route, durations, loop lag: each worker's
// own shard of the metric, which only its loop writes), and the connection and byte counts are read
// from every worker's server and summed when /metrics is rendered (on the primary loop).
class HttpMetrics {
 public:
  HttpMetrics(metrics::Registry& registry, const log::Logs& logs);
  HttpMetrics(const HttpMetrics&) = delete;
  HttpMetrics& operator=(const HttpMetrics&) = delete;

  // Adds a worker's server and loop-lag monitor to the sums. Primary loop thread, which is
  // also where the registry renders, before that worker serves.
  void add_worker(const http::Server& server, const LoopLagMonitor& lag);
  // Brings the per-worker counters (squall_worker_*{worker="i"}) up to date: before each
  // render, on the primary loop.
  void refresh();

  // One worker loop's view: the per-route counters of its current router. Its loop thread.
  class Observer {
   public:
    explicit Observer(HttpMetrics& metrics)
        : metrics_(metrics),
          duration_(metrics.request_duration_.shard_for(this)),
          loop_lag_(metrics.loop_lag_.shard_for(this)) {
      none_ = counters_for("none", nullptr);
    }
    // Makes the per-route counters those of `router`'s routes (at start and after each
    // reload). Counters of routes that are gone stay in the registry with their last values.
    void set_routes(const http::Router& router);
    void observe(const http::RequestRecord& record);
    void observe_loop_lag(double seconds) { loop_lag_.observe(seconds); }

   private:
    struct RouteCounters {
      std::string pattern;   // The route label.
      const char* identity;  // The current router's pattern string.
      std::array<metrics::CounterShard*, 5> by_status_class;  // 1xx..5xx: this loop's.
    };
    RouteCounters counters_for(std::string_view label, const char* identity);

    HttpMetrics& metrics_;
    // This loop's shares of the shared metrics: written here alone, without locked instructions.
    metrics::HistogramShard& duration_;
    metrics::HistogramShard& loop_lag_;
    std::vector<RouteCounters> routes_;  // One per route of the current router.
    RouteCounters none_;                 // Requests that matched no route.
  };

 private:
  struct Worker {
    const http::Server* server;
    const LoopLagMonitor* lag;
    metrics::Counter* accepted;  // squall_worker_connections_accepted_total{worker}.
    metrics::Counter* requests;  // squall_worker_requests_total{worker}.
  };
  // Sums a server counter over the workers (any thread may read them).
  template <class Read>
  std::uint64_t sum(Read read) const;

  metrics::CounterFamily& requests_;  // squall_http_requests_total{route, code}.
  metrics::Histogram& request_duration_;
  metrics::Histogram& loop_lag_;
  metrics::CounterFamily& worker_accepted_;  // Connections accepted, by worker.
  metrics::CounterFamily& worker_requests_;  // Requests answered, by worker.
  std::vector<Worker> workers_;              // Primary loop thread only.
};

struct BuiltinRoutes {
  const metrics::Registry* registry;              // For /metrics.
  HttpMetrics* http_metrics;                      // Refreshed before /metrics renders.
  std::chrono::steady_clock::time_point started;  // For uptime.
  // For /healthz, called on the primary loop: the job store's state ("ok", "failing"), or
  // nullptr without a store; whether the server drains; connections open on every worker;
  // the largest latest loop lag of the workers, in seconds.
  std::function<const char*()> store_status;
  std::function<bool()> draining;
  std::function<std::uint64_t()> connections;
  std::function<double()> loop_lag_seconds;
};

// Adds GET /plaintext, GET /healthz, GET /metrics and POST /echo as `enabled` says, the last
// three behind the rules of `rules` ([auth] healthz, metrics, echo) as `access` applies them.
// /healthz and /metrics are computed on the primary loop through `desk` (the desk of the
// worker loop the router serves). The pointers in `routes` and `desk` must outlive the router.
void add_builtin_routes(http::Router& router, const RoutesConfig& enabled, const AuthConfig& rules,
                        std::shared_ptr<const BuiltinRoutes> routes,
                        std::shared_ptr<const AccessControl> access, AnswerDesk& desk);

}  // namespace squall::squalld

// The daemon's built-in routes and the metrics they report.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "config/config.hpp"
#include "core/loop_lag.hpp"
#include "http/router.hpp"
#include "http/server.hpp"
#include "log/log.hpp"
#include "metrics/metrics.hpp"

namespace squall::daemon {

// Request and connection metrics fed by the server's per-request observer.
class HttpMetrics {
 public:
  HttpMetrics(metrics::Registry& registry, const http::Router& router, const http::Server& server,
              const LoopLagMonitor* lag, const log::Logs& logs);
  void observe(const http::RequestRecord& record);
  void observe_loop_lag(double seconds) { loop_lag_.observe(seconds); }

 private:
  struct RouteCounters {
    const char* pattern;                               // Identity of the route's pattern string.
    std::array<metrics::Counter*, 5> by_status_class;  // 1xx..5xx.
  };
  std::vector<RouteCounters> routes_;  // One per route, plus "none" (pattern "").
  metrics::Histogram& request_duration_;
  metrics::Histogram& loop_lag_;
};

struct BuiltinRoutes {
  const Config& config;                           // [routes] decides which exist.
  const http::Server* server;                     // For /healthz.
  const LoopLagMonitor* lag;                      // For /healthz.
  const metrics::Registry* registry;              // For /metrics.
  std::chrono::steady_clock::time_point started;  // For uptime.
};

// Adds GET /plaintext, GET /healthz, GET /metrics and POST /echo as the config enables them.
// The pointers in `routes` must outlive the router.
void add_builtin_routes(http::Router& router, std::shared_ptr<const BuiltinRoutes> routes);

}  // namespace squall::daemon

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
#include "server/config.hpp"
#include "squall/core/loop_lag.hpp"
#include "squall/http/router.hpp"
#include "squall/http/server.hpp"
#include "squall/log/log.hpp"
#include "squall/metrics/metrics.hpp"

namespace squall::squalld {

// Request and connection metrics fed by the server's per-request observer. The metric families
// are registered once; the per-route counters follow the router (set_routes), so a reload that
// switches routes on gets counters for them.
class HttpMetrics {
 public:
  HttpMetrics(metrics::Registry& registry, const http::Server& server, const LoopLagMonitor* lag,
              const log::Logs& logs);
  // Makes the per-route counters those of `router`'s routes (at start and after each reload).
  // Counters of routes that are gone stay in the registry with their last values.
  void set_routes(const http::Router& router);
  void observe(const http::RequestRecord& record);
  void observe_loop_lag(double seconds) { loop_lag_.observe(seconds); }

 private:
  struct RouteCounters {
    std::string pattern;                               // The route label.
    const char* identity;                              // The current router's pattern string.
    std::array<metrics::Counter*, 5> by_status_class;  // 1xx..5xx.
  };
  RouteCounters counters_for(std::string_view label, const char* identity);

  metrics::CounterFamily& requests_;   // squall_http_requests_total{route, code}.
  std::vector<RouteCounters> routes_;  // One per route of the current router.
  RouteCounters none_;                 // Requests that matched no route.
  metrics::Histogram& request_duration_;
  metrics::Histogram& loop_lag_;
};

struct BuiltinRoutes {
  const http::Server* server;                     // For /healthz.
  const LoopLagMonitor* lag;                      // For /healthz.
  const metrics::Registry* registry;              // For /metrics.
  std::chrono::steady_clock::time_point started;  // For uptime.
  // For /healthz: the job store's state ("ok", "failing"), or nullptr without a store.
  std::function<const char*()> store_status;
};

// Adds GET /plaintext, GET /healthz, GET /metrics and POST /echo as `enabled` says, the last
// three behind the rules of `rules` ([auth] healthz, metrics, echo) as `access` applies them.
// The pointers in `routes` must outlive the router.
void add_builtin_routes(http::Router& router, const RoutesConfig& enabled, const AuthConfig& rules,
                        std::shared_ptr<const BuiltinRoutes> routes,
                        std::shared_ptr<const AccessControl> access);

}  // namespace squall::squalld

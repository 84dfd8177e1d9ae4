#include "server/routes.hpp"

#include <algorithm>

#include <nlohmann/json.hpp>

#include "core/hot.hpp"

namespace squall::squalld {

namespace {
constexpr std::string_view kStatusClasses[5] = {"1xx", "2xx", "3xx", "4xx", "5xx"};
}  // namespace

HttpMetrics::HttpMetrics(metrics::Registry& registry, const log::Logs& logs)
    : requests_(registry.counter("squall_http_requests_total",
                                 "Requests answered, by route and status class.",
                                 {"route", "code"})),
      request_duration_(registry
                            .histogram("squall_http_request_duration_seconds",
                                       "Time from a request's first byte to its answer.",
                                       {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                        0.5, 1, 2.5, 5, 10})
                            .get()),
      loop_lag_(registry
                    .histogram("squall_loop_lag_seconds",
                               "How late the event loop ran a timer: time it was blocked.",
                               {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5})
                    .get()),
      worker_accepted_(registry.counter("squall_worker_connections_accepted_total",
                                        "Client connections accepted, by worker loop.",
                                        {"worker"})),
      worker_requests_(registry.counter("squall_worker_requests_total",
                                        "Requests answered, by worker loop.", {"worker"})) {
  registry.gauge_callback("squall_connections_open", "Client connections open now.", [this] {
    return static_cast<double>(
        sum([](const http::ServerStats& s) { return s.connections_open.load(); }));
  });
  registry.counter_callback(
      "squall_connections_accepted_total", "Client connections accepted.", [this] {
        return sum([](const http::ServerStats& s) { return s.connections_accepted.load(); });
      });
  registry.counter_callback(
      "squall_connections_refused_total",
      "Connections closed at once: over server.max_connections or an accept error.", [this] {
        return sum([](const http::ServerStats& s) { return s.connections_refused.load(); });
      });
  registry.counter_callback("squall_http_received_bytes_total", "Bytes read from clients.", [this] {
    return sum([](const http::ServerStats& s) { return s.bytes_received.load(); });
  });
  registry.counter_callback("squall_http_sent_bytes_total", "Bytes written to clients.", [this] {
    return sum([](const http::ServerStats& s) { return s.bytes_sent.load(); });
  });
  // A request's read buffer and parser come from a pool that keeps spares for the recent peak
  // of requests in flight; one is built only when more are in flight than that.
  registry.counter_callback(
      "squall_http_workspaces_created_total",
      "Request workspaces (read buffer and parser) built; the others were spares reused.", [this] {
        return sum([](const http::ServerStats& s) { return s.workspaces_created.load(); });
      });
  registry.gauge_callback(
      "squall_http_spare_workspaces", "Request workspaces kept for reuse now.", [this] {
        return static_cast<double>(
            sum([](const http::ServerStats& s) { return s.spare_workspaces.load(); }));
      });
  // The server-wide budgets of [limits] max_buffered_body_bytes and max_unsent_bytes, shared
  // by every worker's server.
  registry.gauge_callback(
      "squall_http_buffered_body_bytes", "Request body bytes held by all connections now.", [this] {
        return workers_.empty() ? 0.0
                                : static_cast<double>(workers_.front().server->body_budget().used);
      });
  registry.gauge_callback(
      "squall_http_unsent_bytes", "Response bytes written but not yet read by the clients.",
      [this] {
        return workers_.empty()
                   ? 0.0
                   : static_cast<double>(workers_.front().server->unsent_budget().used);
      });
  const log::Logs* log_ptr = &logs;
  registry.counter_callback("squall_log_dropped_messages_total",
                            "Log messages dropped because the log queue was full.",
                            [log_ptr] { return log_ptr->dropped_messages(); });
  registry.gauge_callback("squall_loop_lag_last_seconds",
                          "The latest loop lag sample (the largest over the workers).", [this] {
                            double largest = 0;
                            for (const Worker& worker : workers_) {
                              largest = std::max(largest, worker.lag->last_lag_seconds());
                            }
                            return largest;
                          });
}

void HttpMetrics::add_worker(const http::Server& server, const LoopLagMonitor& lag) {
  const std::string index = std::to_string(workers_.size());
  workers_.push_back(
      {&server, &lag, &worker_accepted_.with({index}), &worker_requests_.with({index})});
}

void HttpMetrics::refresh() {
  for (Worker& worker : workers_) {
    // The server's own counts only grow; the counters follow them.
    const http::ServerStats& stats = worker.server->stats();
    const std::uint64_t accepted = stats.connections_accepted;
    const std::uint64_t requests = stats.requests;
    if (accepted > worker.accepted->value())
      worker.accepted->inc(accepted - worker.accepted->value());
    if (requests > worker.requests->value())
      worker.requests->inc(requests - worker.requests->value());
  }
}

template <class Read>
std::uint64_t HttpMetrics::sum(Read read) const {
  std::uint64_t total = 0;
  for (const Worker& worker : workers_) total += read(worker.server->stats());
  return total;
}

HttpMetrics::Observer::RouteCounters HttpMetrics::Observer::counters_for(std::string_view label,
                                                                         const char* identity) {
  RouteCounters counters{std::string(label), identity, {}};
  for (std::size_t i = 0; i < 5; ++i) {
    counters.by_status_class[i] =
        &metrics_.requests_.with({label, kStatusClasses[i]}).shard_for(this);
  }
  return counters;
}

void HttpMetrics::Observer::set_routes(const http::Router& router) {
  std::vector<RouteCounters> routes;
  routes.reserve(router.routes().size());
  for (const http::Route& route : router.routes()) {
    // Two methods on one pattern share the label, and so the counters.
    routes.push_back(counters_for(route.pattern, route.pattern.c_str()));
  }
  routes_ = std::move(routes);
}

SQUALL_HOT void HttpMetrics::Observer::observe(const http::RequestRecord& record) {
  const auto status_class = static_cast<std::size_t>(std::clamp(record.status / 100, 1, 5) - 1);
  RouteCounters* found = nullptr;
  if (record.route.empty()) {
    found = &none_;
  } else {
    // The pattern's address identifies the route of the current router; a request dispatched
    // before a reload carries the old router's string, found by value.
    for (RouteCounters& route : routes_) {
      if (route.identity == record.route.data()) {
        found = &route;
        break;
      }
    }
    if (found == nullptr) {
      for (RouteCounters& route : routes_) {
        if (route.pattern == record.route) {
          found = &route;
          break;
        }
      }
    }
  }
  if (found != nullptr) {
    found->by_status_class[status_class]->inc();
  } else {
    // A route removed by a reload answering late: rare, so the locked lookup is fine.
    metrics_.requests_.with({record.route, kStatusClasses[status_class]}).inc();
  }
  duration_.observe(std::chrono::duration<double>(record.duration).count());
}

void add_builtin_routes(http::Router& router, const RoutesConfig& enabled, const AuthConfig& rules,
                        std::shared_ptr<const BuiltinRoutes> routes,
                        std::shared_ptr<const AccessControl> access, AnswerDesk& desk) {
  if (enabled.plaintext) {
    router.add("GET", "/plaintext", [](http::Request&, http::Responder responder) {
      responder.send(200, "text/plain", "Hello, World!");
    });
  }
  if (enabled.healthz) {
    router.add(
        "GET", "/healthz",
        [routes, access, rule = rules.healthz, &desk](http::Request& request,
                                                      http::Responder responder) {
          if (!access->allow(rule, request, responder)) return;
          // The job store's state and the workers' figures live on the primary loop.
          desk.on_primary(responder, [routes](const Reply& reply) {
            const bool draining = routes->draining();
            const char* store = routes->store_status ? routes->store_status() : nullptr;
            const bool store_failing = store != nullptr && std::string_view(store) != "ok";
            const auto uptime = std::chrono::steady_clock::now() - routes->started;
            nlohmann::json body = {
                {"status", draining        ? "draining"
                           : store_failing ? "failing"
                                           : "ok"},
                {"uptime_seconds", std::chrono::duration<double>(uptime).count()},
                {"connections", routes->connections()},
                {"loop_lag_ms", routes->loop_lag_seconds() * 1000},
            };
            if (store != nullptr) body["store"] = store;
            // A draining server, or one whose job store refuses writes, answers 503 so
            // a load balancer sends its traffic elsewhere.
            reply(Answer{
                draining || store_failing ? 503 : 200, "application/json", {}, body.dump() + "\n"});
          });
        });
  }
  if (enabled.metrics) {
    router.add(
        "GET", "/metrics",
        [routes, access, rule = rules.metrics, &desk](http::Request& request,
                                                      http::Responder responder) {
          if (!access->allow(rule, request, responder)) return;
          // Rendered on the primary loop, where the loop-owned figures it reads live.
          desk.on_primary(responder, [routes](const Reply& reply) {
            if (routes->http_metrics != nullptr) routes->http_metrics->refresh();
            reply(Answer{
                200, "text/plain; version=0.0.4; charset=utf-8", {}, routes->registry->render()});
          });
        });
  }
  if (enabled.echo) {
    router.add("POST", "/echo",
               [access, rule = rules.echo](http::Request& request, http::Responder responder) {
                 if (!access->allow(rule, request, responder)) return;
                 const auto content_type = request.header("content-type");
                 responder.send(200, content_type.value_or("application/octet-stream"),
                                request.body());
               });
  }
}

}  // namespace squall::squalld

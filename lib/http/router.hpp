// Routing by method and path pattern: "/plaintext", "/jobs/{id}". An unknown path is 404; a
// known path with another method is 405 with the methods it has in Allow.
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "http/request.hpp"
#include "http/responder.hpp"

namespace squall::http {

// A handler answers through the Responder now or later (keeping it); the Request stays valid
// until the answer is sent. An exception escaping a handler becomes a 500.
using Handler = std::function<void(Request& request, Responder responder)>;

struct Route {
  std::string method;                 // "GET", "POST", ...
  std::string pattern;                // As registered; also the metrics' route label.
  std::vector<std::string> segments;  // The pattern split at '/'; "{name}" is a parameter.
  Handler handler;                    // What answers.
};

struct RouteMatch {
  const Route* route = nullptr;  // Set when status is 200.
  int status = 404;              // 200 (found), 404 (no such path), 405 (path, not method).
  std::string allow;             // For 405: "GET, HEAD".
};

class Router {
 public:
  // Adds a route. Throws std::invalid_argument for a malformed pattern or a duplicate.
  void add(std::string_view method, std::string_view pattern, Handler handler);

  // Finds the route for `method` and the decoded `path`, filling request.params_ through
  // `params`. HEAD is answered by the GET route when no HEAD route exists.
  RouteMatch find(std::string_view method, std::string_view path,
                  std::vector<RouteParam>& params) const;

  const std::vector<Route>& routes() const noexcept { return routes_; }

 private:
  std::vector<Route> routes_;  // In registration order; few enough that a scan is fastest.
};

}  // namespace squall::http

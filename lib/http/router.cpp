#include "squall/http/router.hpp"

#include <stdexcept>

#include "core/hot.hpp"
#include "http/short_equal.hpp"

namespace squall::http {

namespace {

// Splits "/a/b/" into {"a", "b", ""}; the leading '/' is required and dropped.
template <typename Out>
void split_path(std::string_view path, Out&& out) {
  path.remove_prefix(1);
  while (true) {
    const auto slash = path.find('/');
    out(path.substr(0, slash));
    if (slash == std::string_view::npos) break;
    path.remove_prefix(slash + 1);
  }
}

bool is_parameter(std::string_view segment) noexcept {
  return segment.size() > 2 && segment.front() == '{' && segment.back() == '}';
}

// Matches `path` against the segments of a route with parameters, appending them on success.
bool match_segments(const Route& route, std::string_view path, std::vector<RouteParam>& params) {
  const std::size_t params_before = params.size();
  std::size_t index = 0;
  bool matched = true;
  split_path(path, [&](std::string_view segment) {
    if (!matched) return;
    if (index >= route.segments.size()) {
      matched = false;
      return;
    }
    const std::string& expected = route.segments[index++];
    if (is_parameter(expected)) {
      if (segment.empty()) {
        matched = false;
        return;
      }
      params.push_back(
          RouteParam{std::string_view(expected).substr(1, expected.size() - 2), segment});
    } else if (segment != expected) {
      matched = false;
    }
  });
  matched = matched && index == route.segments.size();
  if (!matched) params.resize(params_before);
  return matched;
}

// Matches `path` against a route, appending its parameters on success. In line: most routes
// have none and are one compare.
inline bool match(const Route& route, std::string_view path, std::vector<RouteParam>& params) {
  // Segments without parameters match exactly the paths that join to the pattern.
  if (!route.has_parameters) return detail::short_equal(path, route.pattern);
  return match_segments(route, path, params);
}

void append_allow(std::string& allow, std::string_view method) {
  if (allow.find(method) != std::string::npos) return;
  if (!allow.empty()) allow += ", ";
  allow += method;
}

}  // namespace

void Router::add(std::string_view method, std::string_view pattern, Handler handler,
                 BodyMode body_mode) {
  if (pattern.empty() || pattern.front() != '/') {
    throw std::invalid_argument("route pattern must start with '/': \"" + std::string(pattern) +
                                "\"");
  }
  Route route;
  route.method = method;
  route.pattern = pattern;
  route.handler = std::move(handler);
  route.body_mode = body_mode;
  split_path(pattern, [&](std::string_view segment) {
    if (segment.find_first_of("{}") != std::string_view::npos && !is_parameter(segment)) {
      throw std::invalid_argument("route pattern \"" + std::string(pattern) +
                                  "\": a parameter must be a whole segment such as {id}");
    }
    if (is_parameter(segment)) route.has_parameters = true;
    route.segments.emplace_back(segment);
  });
  for (const Route& existing : routes_) {
    if (existing.method == route.method && existing.segments == route.segments) {
      throw std::invalid_argument("route " + route.method + " " + route.pattern +
                                  " is registered twice");
    }
  }
  routes_.push_back(std::move(route));
  streams_bodies_ = streams_bodies_ || body_mode == BodyMode::stream;
}

SQUALL_HOT RouteMatch Router::find(std::string_view method, std::string_view path,
                                   std::vector<RouteParam>& params) const {
  RouteMatch result;
  if (path.empty() || path.front() != '/') return result;
  const Route* get_route = nullptr;
  for (const Route& route : routes_) {
    const std::size_t params_before = params.size();
    if (!match(route, path, params)) continue;
    if (detail::short_equal(route.method, method)) {
      result.route = &route;
      result.status = 200;
      return result;
    }
    params.resize(params_before);
    if (route.method == "GET" && get_route == nullptr) get_route = &route;
    append_allow(result.allow, route.method);
    if (route.method == "GET") append_allow(result.allow, "HEAD");
    result.status = 405;
  }
  if (method == "HEAD" && get_route != nullptr) {
    match(*get_route, path, params);
    result.route = get_route;
    result.status = 200;
    result.allow.clear();
  }
  return result;
}

}  // namespace squall::http

// Routing by method and path pattern: "/plaintext", "/jobs/{id}". An unknown path is 404; a
// known path with another method is 405 with the methods it has in Allow.
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "squall/core/task.hpp"
#include "squall/http/body_reader.hpp"
#include "squall/http/request.hpp"
#include "squall/http/responder.hpp"
#include "squall/http/response.hpp"

namespace squall::http {

// A handler answers through the Responder now or later (keeping it); the Request stays valid
// until the answer is sent. An exception escaping a handler becomes a 500.
using Handler = std::function<void(Request& request, Responder responder)>;

// A coroutine handler: any callable taking (Request&, Responder) and returning Task<void>:
//
//   Task<void> slow_hello(Loop& loop, http::Request& request, http::Responder responder) {
//     std::string name(request.query("name").value_or("world"));  // Copy before suspending.
//     co_await sleep(loop, 100ms);
//     responder.send(200, "text/plain", "hello " + name + "\n");
//   }
//   router.add("GET", "/hello", [&loop](http::Request& request, http::Responder responder) {
//     return slow_hello(loop, request, std::move(responder));
//   });
//
// The Request stays valid while the task holds the Responder and has not answered; copy what it
// needs after answering. The task's stop token fires when the client goes away first: every
// await in it then throws CancelledError. An escaping exception is a 500 and a log line, as for a
// callback. Write the coroutine as a named function (or a lambda without captures): a capturing
// lambda that is itself a coroutine leaves its frame pointing at captures that may be gone.
template <typename Fn>
concept CoroutineHandler =
    std::is_same_v<std::invoke_result_t<Fn&, Request&, Responder>, Task<void>>;

// A coroutine handler that returns the whole response: any callable taking (const Request&) and
// returning Task<Response>, as Tornado's handler that computes its answer and returns it:
//
//   Task<http::Response> greet(Loop& loop, const http::Request& request) {
//     std::string name(request.query("name").value_or("world"));  // Copy before suspending.
//     co_await sleep(loop, 100ms);
//     co_return http::Response(200, "text/plain", "hello " + name + "\n");
//   }
//   router.add("GET", "/greet", [&loop](const http::Request& request) {
//     return greet(loop, request);
//   });
//
// The Request stays valid until the task returns (its answer is sent then). Everything else is
// as for a Task<void> handler: the task is cancelled (its awaits throw CancelledError) when the
// client goes away first, and an escaping exception is a 500 and a log line.
template <typename Fn>
concept ResponseHandler = std::is_same_v<std::invoke_result_t<Fn&, const Request&>, Task<Response>>;

struct Route {
  std::string method;                 // "GET", "POST", ...
  std::string pattern;                // As registered; also the metrics' route label.
  std::vector<std::string> segments;  // The pattern split at '/'; "{name}" is a parameter.
  Handler handler;                    // What answers.
  bool has_parameters = false;        // Some segment is "{name}"; otherwise only `pattern` matches.
  // The whole body before the handler runs, or the body as it arrives.
  BodyMode body_mode = BodyMode::buffered;
};

struct RouteMatch {
  const Route* route = nullptr;  // Set when status is 200.
  int status = 404;              // 200 (found), 404 (no such path), 405 (path, not method).
  std::string allow;             // For 405: "GET, HEAD".
};

class Router {
 public:
  // Adds a route. Throws std::invalid_argument for a malformed pattern or a duplicate. With
  // BodyMode::stream the handler runs as soon as the request's head is complete and reads the
  // body through request.body_reader() (see body_reader.hpp).
  void add(std::string_view method, std::string_view pattern, Handler handler,
           BodyMode body_mode = BodyMode::buffered);
  // The same for a coroutine handler (see CoroutineHandler).
  template <CoroutineHandler Fn>
  void add(std::string_view method, std::string_view pattern, Fn handler,
           BodyMode body_mode = BodyMode::buffered) {
    add(method, pattern,
        Handler([handler = std::move(handler)](Request& request, Responder responder) mutable {
          const Responder runner = responder;
          runner.run_handler(handler(request, std::move(responder)));
        }),
        body_mode);
  }

  // The same for a handler returning the whole response (see ResponseHandler).
  template <ResponseHandler Fn>
  void add(std::string_view method, std::string_view pattern, Fn handler) {
    add(method, pattern,
        Handler([handler = std::move(handler)](Request& request, Responder responder) mutable {
          responder.run_handler(handler(std::as_const(request)));
        }));
  }

  // Finds the route for `method` and the decoded `path`, filling request.params_ through
  // `params`. HEAD is answered by the GET route when no HEAD route exists.
  RouteMatch find(std::string_view method, std::string_view path,
                  std::vector<RouteParam>& params) const;

  const std::vector<Route>& routes() const noexcept { return routes_; }
  // Whether any route streams its request body (the connection then routes at the head).
  bool streams_bodies() const noexcept { return streams_bodies_; }

 private:
  std::vector<Route> routes_;  // In registration order; few enough that a scan is fastest.
  // Whether some route has BodyMode::stream.
  bool streams_bodies_ = false;
};

}  // namespace squall::http

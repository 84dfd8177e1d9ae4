// The server of bench/plaintext_coroutine.sh and bench/plaintext_coroutine_callgrind.sh: the same
// /plaintext answer from a callback handler (GET /callback), from a Task<void> coroutine handler
// (GET /coroutine) and from a Task<Response> one (GET /response), in one process, so one run
// compares the server CPU each costs per request. Prints its address, runs until killed.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "squall/core/loop.hpp"
#include "squall/core/signals.hpp"
#include "squall/core/task.hpp"
#include "squall/http/response.hpp"
#include "squall/http/router.hpp"
#include "squall/http/server.hpp"

namespace {

constexpr std::string_view kBody = "Hello, World!";

squall::Task<void> plaintext_coroutine(squall::http::Request&, squall::http::Responder responder) {
  responder.send(200, "text/plain", kBody);
  co_return;
}

squall::Task<squall::http::Response> plaintext_response(const squall::http::Request&) {
  co_return squall::http::Response(200, "text/plain", std::string(kBody));
}

}  // namespace

int main(int argc, char** argv) {
  squall::ignore_sigpipe();
  squall::Loop loop;
  squall::http::Router router;
  // argv[2], if given, names the route registered first: the router scans routes in order, so
  // a per-route measurement (bench/plaintext_coroutine_callgrind.sh) puts its own first.
  const std::string first = argc > 2 ? argv[2] : "callback";
  for (const std::string& name :
       {first, std::string("callback"), std::string("coroutine"), std::string("response")}) {
    if (router.routes().size() == 3) break;
    bool known = false;
    for (const auto& route : router.routes()) known = known || route.pattern == "/" + name;
    if (known) continue;
    if (name == "callback") {
      router.add("GET", "/callback", [](squall::http::Request&, squall::http::Responder responder) {
        responder.send(200, "text/plain", kBody);
      });
    } else if (name == "coroutine") {
      router.add("GET", "/coroutine", &plaintext_coroutine);
    } else if (name == "response") {
      router.add("GET", "/response", &plaintext_response);
    } else {
      std::fprintf(stderr, "unknown route %s (callback, coroutine, response)\n", name.c_str());
      return 2;
    }
  }
  squall::http::ServerOptions options;
  options.max_connections = 100000;
  squall::http::Server server(loop, std::make_shared<const squall::http::Router>(router), options);
  const auto port = static_cast<std::uint16_t>(argc > 1 ? std::atoi(argv[1]) : 0);
  std::printf("%s\n", server.listen("127.0.0.1", port).c_str());
  std::fflush(stdout);
  loop.run();
  return 0;
}

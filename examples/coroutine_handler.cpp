// A coroutine handler, Tornado's `async def get(self)`: it awaits work on the thread pool, then a
// sleep on the loop, and answers; the loop serves other clients meanwhile. The same handler is
// written twice: answering through its Responder (/digest), and returning the whole response as
// a value (/digest.json, a Task<Response>). Build with `make examples`, run
// `build/examples/coroutine_handler 8081`, then:
//   curl 'localhost:8081/digest?text=abc&delay_ms=200'
//   curl -i 'localhost:8081/digest.json?text=abc&delay_ms=200'
// Usage: coroutine_handler [PORT] [--port-file FILE]  (port 0 picks a free one; FILE gets it).
// SIGINT or SIGTERM drains and exits 0.
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <string>

#include <squall/core/awaitables.hpp>
#include <squall/core/loop.hpp>
#include <squall/core/signals.hpp>
#include <squall/core/task.hpp>
#include <squall/http/response.hpp>
#include <squall/http/router.hpp>
#include <squall/http/server.hpp>

using namespace squall;

namespace {

// Blocking CPU work: runs on the pool, so it owns its input.
std::string slow_digest(const std::string& text) {
  std::size_t digest = 0;
  for (int round = 0; round < 200'000; ++round) {
    digest = std::hash<std::string>{}(text + std::to_string(digest));
  }
  char hex[32];
  std::snprintf(hex, sizeof hex, "%016zx", digest);
  return hex;
}

// Take parameters by value (the Responder) or as the documented Request&; copy from the request
// what the work needs.
Task<void> digest(Loop& loop, http::Request& request, http::Responder responder) {
  std::string text = request.query("text").value_or("");
  const long delay_ms = std::strtol(request.query("delay_ms").value_or("0").c_str(), nullptr, 10);
  if (delay_ms < 0 || delay_ms > 10'000) {
    responder.send(400, "text/plain", "delay_ms must be between 0 and 10000\n");
    co_return;
  }
  // Name the callable before the co_await (g++ 12 mishandles capturing lambda temporaries
  // inside a co_await expression).
  auto work = [text] { return slow_digest(text); };
  std::string hex = co_await run_blocking(loop, std::move(work));
  co_await sleep(loop, std::chrono::milliseconds(delay_ms));
  responder.send(200, "text/plain", hex + "\n");
}

// The same work as a handler that returns its answer: the Request stays valid until it returns.
// A throw here would be a 500 and a log line, as for the other forms.
Task<http::Response> digest_json(Loop& loop, const http::Request& request) {
  std::string text = request.query("text").value_or("");
  const long delay_ms = std::strtol(request.query("delay_ms").value_or("0").c_str(), nullptr, 10);
  if (delay_ms < 0 || delay_ms > 10'000) {
    co_return http::Response(400, "text/plain", "delay_ms must be between 0 and 10000\n");
  }
  auto work = [text] { return slow_digest(text); };
  std::string hex = co_await run_blocking(loop, std::move(work));
  co_await sleep(loop, std::chrono::milliseconds(delay_ms));
  co_return http::Response(200, "application/json", "{\"digest\":\"" + hex + "\"}\n")
      .header("Cache-Control", "max-age=60");
}

}  // namespace

int main(int argc, char** argv) {
  std::uint16_t port = 8081;
  std::string port_file;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--port-file" && i + 1 < argc) {
      port_file = argv[++i];
    } else {
      port = static_cast<std::uint16_t>(std::atoi(argv[i]));
    }
  }
  ignore_sigpipe();
  Loop loop;
  http::Router router;
  router.add("GET", "/digest", [&loop](http::Request& request, http::Responder responder) {
    return digest(loop, request, std::move(responder));
  });
  router.add("GET", "/digest.json",
             [&loop](const http::Request& request) { return digest_json(loop, request); });
  http::Server server(loop, std::make_shared<const http::Router>(std::move(router)), {});
  server.listen("127.0.0.1", port);
  const std::uint16_t bound = server.listeners().front()->bound_port();
  std::printf("listening on 127.0.0.1:%u\n", static_cast<unsigned>(bound));
  std::fflush(stdout);
  if (!port_file.empty()) std::ofstream(port_file) << bound << "\n";
  const auto stop = [&] { server.drain(std::chrono::seconds(5), [&] { loop.stop(); }); };
  SignalWatcher on_int(loop, SIGINT, stop);
  SignalWatcher on_term(loop, SIGTERM, stop);
  loop.run();
  return 0;
}

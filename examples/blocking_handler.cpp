// What a handler that blocks the loop costs, and how squall tells you which one it was. /block
// sleeps on the loop thread (the mistake: a synchronous call, a big parse); while it does, no
// other client is served, not even /hello. The server logs
//   connection N: handler for GET /block blocked the event loop for 300.2 ms
//   (loop.blocking_threshold 50 ms)
// and a LoopLagMonitor reports how late the loop ran its timers. The fix is /fixed: the same
// work through run_blocking, on the pool. Build with `make examples`, run
// `build/examples/blocking_handler 8081`, then:
//   curl 'localhost:8081/block?ms=300' & curl localhost:8081/hello
// Usage: blocking_handler [PORT] [--port-file FILE]. SIGINT or SIGTERM drains and exits 0.
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include <spdlog/spdlog.h>

#include <squall/core/awaitables.hpp>
#include <squall/core/loop.hpp>
#include <squall/core/loop_lag.hpp>
#include <squall/core/signals.hpp>
#include <squall/core/task.hpp>
#include <squall/http/router.hpp>
#include <squall/http/server.hpp>

using namespace squall;

namespace {

std::chrono::milliseconds requested_ms(const http::Request& request) {
  const long ms = std::strtol(request.query("ms").value_or("300").c_str(), nullptr, 10);
  return std::chrono::milliseconds(ms < 0 || ms > 10'000 ? 300 : ms);
}

Task<void> fixed(Loop& loop, http::Request& request, http::Responder responder) {
  const auto ms = requested_ms(request);
  auto slow = [ms] { std::this_thread::sleep_for(ms); };
  co_await run_blocking(loop, std::move(slow));
  responder.send(200, "text/plain", "worked on the pool\n");
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
  router.add("GET", "/block", [](http::Request& request, http::Responder responder) {
    std::this_thread::sleep_for(requested_ms(request));  // Blocks every client: don't.
    responder.send(200, "text/plain", "blocked the loop\n");
  });
  router.add("GET", "/fixed", [&loop](http::Request& request, http::Responder responder) {
    return fixed(loop, request, std::move(responder));
  });
  router.add("GET", "/hello", [](http::Request&, http::Responder responder) {
    responder.send(200, "text/plain", "hello\n");
  });
  http::ServerOptions options;
  options.blocking_threshold = std::chrono::milliseconds(50);
  http::Server server(loop, std::make_shared<const http::Router>(std::move(router)), options);
  // Samples every 50 ms how late the loop runs a timer; above 50 ms something blocked it.
  LoopLagMonitor lag(loop, std::chrono::milliseconds(50), [](double lag_seconds) {
    if (lag_seconds > 0.05) spdlog::warn("event loop lag {:.1f} ms", lag_seconds * 1e3);
  });
  server.listen("127.0.0.1", port);
  const std::uint16_t bound = server.listeners().front()->bound_port();
  std::printf("listening on 127.0.0.1:%u\n", static_cast<unsigned>(bound));
  std::fflush(stdout);
  if (!port_file.empty()) std::ofstream(port_file) << bound << "\n";
  const auto stop = [&] {
    lag.stop();
    server.drain(std::chrono::seconds(5), [&] { loop.stop(); });
  };
  SignalWatcher on_int(loop, SIGINT, stop);
  SignalWatcher on_term(loop, SIGTERM, stop);
  loop.run();
  return 0;
}

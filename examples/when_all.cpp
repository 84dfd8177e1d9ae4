// Two slow things at once, Tornado's `await gen.multi([...])`: a handler starts a wait on the
// loop (say, a remote service) and a computation on the thread pool together with when_all, and
// answers when both are done: the time taken is the slower one's, not the sum. Build with
// `make examples`, run `build/examples/when_all 8081`, then:
//   curl 'localhost:8081/both?wait_ms=300&work_ms=400'
// Usage: when_all [PORT] [--port-file FILE]. SIGINT or SIGTERM drains and exits 0.
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include <squall/core/awaitables.hpp>
#include <squall/core/loop.hpp>
#include <squall/core/signals.hpp>
#include <squall/core/task.hpp>
#include <squall/http/router.hpp>
#include <squall/http/server.hpp>

using namespace squall;

namespace {

// Stands in for a call to another service: it waits on the loop without blocking it.
Task<std::string> remote_lookup(Loop& loop, std::chrono::milliseconds wait) {
  co_await sleep(loop, wait);
  co_return "lookup done";
}

// Stands in for blocking work (a file, a library without async API): it runs on the pool.
std::string blocking_report(std::chrono::milliseconds work) {
  std::this_thread::sleep_for(work);
  return "report done";
}

long query_ms(const http::Request& request, std::string_view name) {
  return std::strtol(request.query(name).value_or("0").c_str(), nullptr, 10);
}

Task<void> both(Loop& loop, http::Request& request, http::Responder responder) {
  const auto wait = std::chrono::milliseconds(query_ms(request, "wait_ms"));
  const auto work = std::chrono::milliseconds(query_ms(request, "work_ms"));
  if (wait.count() < 0 || wait.count() > 10'000 || work.count() < 0 || work.count() > 10'000) {
    responder.send(400, "text/plain", "wait_ms and work_ms must be between 0 and 10000\n");
    co_return;
  }
  const std::uint64_t started = loop.now_ms();
  auto report = [work] { return blocking_report(work); };
  auto together = when_all(remote_lookup(loop, wait), run_blocking(loop, std::move(report)));
  auto [lookup, result] = co_await std::move(together);
  const std::uint64_t took = loop.now_ms() - started;
  responder.send(200, "text/plain",
                 lookup + ", " + result + " in " + std::to_string(took) + " ms\n");
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
  router.add("GET", "/both", [&loop](http::Request& request, http::Responder responder) {
    return both(loop, request, std::move(responder));
  });
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

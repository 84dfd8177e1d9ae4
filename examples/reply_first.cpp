// Reply first, then finish the work on the pool (the "sleep" handler of Tornado's guide, which
// calls self.finish() and then awaits run_in_executor): the client gets its 202 at once, and the
// coroutine goes on after the answer. GET /status shows how many jobs finished. Build with
// `make examples`, run `build/examples/reply_first 8081`, then:
//   curl 'localhost:8081/work?ms=500'; curl localhost:8081/status; sleep 1; curl
//   localhost:8081/status
// Usage: reply_first [PORT] [--port-file FILE]. SIGINT or SIGTERM drains and exits 0.
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

struct Counters {
  int accepted = 0;  // Jobs answered with 202.
  int finished = 0;  // Jobs whose work ended. Loop thread only, like everything here.
};

Task<void> work(Loop& loop, Counters& counters, http::Request& request, http::Responder responder) {
  const long ms = std::strtol(request.query("ms").value_or("100").c_str(), nullptr, 10);
  if (ms < 0 || ms > 10'000) {
    responder.send(400, "text/plain", "ms must be between 0 and 10000\n");
    co_return;
  }
  const int job = ++counters.accepted;
  // The answer goes out now. After it the Request is gone: everything needed was copied above.
  responder.send(202, "text/plain", "job " + std::to_string(job) + " accepted\n");
  auto slow = [ms] { std::this_thread::sleep_for(std::chrono::milliseconds(ms)); };
  co_await run_blocking(loop, std::move(slow));
  ++counters.finished;
  std::printf("job %d finished\n", job);
  std::fflush(stdout);
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
  Counters counters;
  http::Router router;
  router.add("GET", "/work", [&](http::Request& request, http::Responder responder) {
    return work(loop, counters, request, std::move(responder));
  });
  router.add("GET", "/status", [&](http::Request&, http::Responder responder) {
    responder.send(200, "text/plain",
                   "accepted " + std::to_string(counters.accepted) + " finished " +
                       std::to_string(counters.finished) + "\n");
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

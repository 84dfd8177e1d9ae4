// A small service on squall's library: one route answered at once, one answered after blocking
// work on the thread pool, one answered later from a timer. Build with `make examples`, run
// `build/examples/hello_async 8081`, then:
//   curl localhost:8081/hello
//   curl localhost:8081/slow-hash?text=abc
//   curl localhost:8081/later/250
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>

#include <squall/core/loop.hpp>
#include <squall/core/signals.hpp>
#include <squall/http/router.hpp>
#include <squall/http/server.hpp>

using namespace squall;

int main(int argc, char** argv) {
  const auto port = static_cast<std::uint16_t>(argc > 1 ? std::atoi(argv[1]) : 8081);
  ignore_sigpipe();
  Loop loop;
  http::Router router;

  // Answered now, on the loop thread.
  router.add("GET", "/hello", [](http::Request&, http::Responder responder) {
    responder.send(200, "text/plain", "hello\n");
  });

  // Blocking work goes to the pool; the job copies its input and never touches the request.
  router.add("GET", "/slow-hash", [&loop](http::Request& request, http::Responder responder) {
    auto text = std::make_shared<std::string>(request.query("text").value_or(""));
    auto digest = std::make_shared<std::size_t>(0);
    loop.run_blocking(
        [text, digest] {
          for (int round = 0; round < 1'000'000; ++round) {
            *digest = std::hash<std::string>{}(*text + std::to_string(*digest));
          }
        },
        [responder, digest](std::exception_ptr error) {
          if (error) {
            responder.send(500, "text/plain", "hashing failed\n");
            return;
          }
          responder.send(200, "text/plain", std::to_string(*digest) + "\n");
        });
  });

  // Answered later from a timer; if the client leaves first, send() returns false.
  router.add("GET", "/later/{ms}", [&loop](http::Request& request, http::Responder responder) {
    const long delay = std::strtol(std::string(request.param("ms")).c_str(), nullptr, 10);
    if (delay < 0 || delay > 10'000) {
      responder.send(400, "text/plain", "ms must be between 0 and 10000\n");
      return;
    }
    loop.call_later(std::chrono::milliseconds(delay), [responder, delay] {
      responder.send(200, "text/plain", "waited " + std::to_string(delay) + " ms\n");
    });
  });

  http::Server server(loop, std::make_shared<const http::Router>(std::move(router)),
                      http::ServerOptions{});
  std::printf("listening on %s\n", server.listen("127.0.0.1", port).c_str());
  SignalWatcher on_int(loop, SIGINT,
                       [&] { server.drain(std::chrono::seconds(5), [&] { loop.stop(); }); });
  loop.run();
  return 0;
}

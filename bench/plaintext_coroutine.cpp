// The server of bench/plaintext_coroutine.sh: the same /plaintext answer from a callback handler
// (GET /callback) and from a coroutine handler (GET /coroutine), in one process, so one run
// compares the server CPU each costs per request. Prints its address, runs until killed.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "squall/core/loop.hpp"
#include "squall/core/signals.hpp"
#include "squall/core/task.hpp"
#include "squall/http/router.hpp"
#include "squall/http/server.hpp"

namespace {

constexpr std::string_view kBody = "Hello, World!";

squall::Task<void> plaintext_coroutine(squall::http::Request&, squall::http::Responder responder) {
  responder.send(200, "text/plain", kBody);
  co_return;
}

}  // namespace

int main(int argc, char** argv) {
  squall::ignore_sigpipe();
  squall::Loop loop;
  squall::http::Router router;
  router.add("GET", "/callback", [](squall::http::Request&, squall::http::Responder responder) {
    responder.send(200, "text/plain", kBody);
  });
  router.add("GET", "/coroutine", &plaintext_coroutine);
  squall::http::ServerOptions options;
  options.max_connections = 100000;
  squall::http::Server server(loop, std::make_shared<const squall::http::Router>(router), options);
  const auto port = static_cast<std::uint16_t>(argc > 1 ? std::atoi(argv[1]) : 0);
  std::printf("%s\n", server.listen("127.0.0.1", port).c_str());
  std::fflush(stdout);
  loop.run();
  return 0;
}

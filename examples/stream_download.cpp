// A streamed response with back-pressure: GET /stream?mib=N sends N MiB (at most 1024) in 64 KiB
// chunks, and waits with `co_await responder.drained()` whenever the client reads slower than it
// is sent, so a slow client costs about [limits] write_buffer_high_water, not N MiB. After each
// response it prints how often it waited and the most unsent bytes it saw. Build with
// `make examples`, run `build/examples/stream_download 8082`, then:
//   curl -s 'localhost:8082/stream?mib=100' | wc -c
// Usage: stream_download [PORT] [--port-file FILE]  (port 0 picks a free one; FILE gets it).
// SIGINT or SIGTERM drains and exits 0.
#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

#include <squall/core/loop.hpp>
#include <squall/core/signals.hpp>
#include <squall/core/task.hpp>
#include <squall/http/router.hpp>
#include <squall/http/server.hpp>

using namespace squall;

namespace {

constexpr std::size_t kChunk = 64 * 1024;

Task<void> stream(http::Request& request, http::Responder responder) {
  const long mib = std::strtol(request.query("mib").value_or("1").c_str(), nullptr, 10);
  if (mib < 0 || mib > 1024) {
    responder.send(400, "text/plain", "mib must be between 0 and 1024\n");
    co_return;
  }
  // A repeating pattern the client can check: byte i of the body is 'a' + i % 26. The chunk
  // sent is a 64 KiB window of a slightly longer buffer, starting where the last one ended.
  std::string pattern(kChunk + 26, '\0');
  for (std::size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<char>('a' + i % 26);
  const std::size_t total = static_cast<std::size_t>(mib) * 1024 * 1024;
  responder.start(200, "application/octet-stream");
  std::size_t sent = 0;
  std::size_t waits = 0;
  std::size_t most_unsent = 0;
  while (sent < total) {
    responder.write(std::string_view(pattern).substr(sent % 26, kChunk));
    sent += kChunk;
    most_unsent = std::max(most_unsent, responder.unsent_bytes());
    if (!responder.writable()) {
      ++waits;
      co_await responder.drained();  // CancelledError here when the client leaves.
    }
  }
  responder.finish();
  std::printf("streamed %ld MiB, waited %zu times, at most %zu bytes unsent\n", mib, waits,
              most_unsent);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  std::uint16_t port = 8082;
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
  router.add("GET", "/stream", &stream);
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

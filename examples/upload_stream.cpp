// A streamed upload: POST /upload reads the request body as it arrives (BodyMode::stream), counts
// its bytes and computes their FNV-1a 64-bit checksum, and answers with the totals, without ever
// holding the whole body: a 1 GiB upload costs about BodyReader::kHighWater (64 KiB) of buffer.
// POST /upload?delay_ms=N sleeps N ms after each chunk: a slow consumer, whose client the
// connection then slows down (it stops reading the socket) instead of buffering. POST
// /upload-callbacks does the same with the callback form (on_data, on_end, on_error).
// Build with `make examples`, run `build/examples/upload_stream 8083`, then:
//   head -c 100M /dev/urandom | curl -s -T - localhost:8083/upload
// Usage: upload_stream [PORT] [--port-file FILE]  (port 0 picks a free one; FILE gets it).
// SIGINT or SIGTERM drains and exits 0.
#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>

#include <squall/core/awaitables.hpp>
#include <squall/core/loop.hpp>
#include <squall/core/signals.hpp>
#include <squall/core/task.hpp>
#include <squall/http/body_reader.hpp>
#include <squall/http/router.hpp>
#include <squall/http/server.hpp>

using namespace squall;

namespace {

// FNV-1a, 64 bits: simple enough to check from any language.
struct Checksum {
  std::uint64_t bytes = 0;
  std::uint64_t hash = 0xcbf29ce484222325ULL;
  std::size_t most_buffered = 0;  // The most bytes the reader held when a chunk was taken.

  void add(std::string_view chunk) {
    bytes += chunk.size();
    for (const char c : chunk) {
      hash ^= static_cast<unsigned char>(c);
      hash *= 0x100000001b3ULL;
    }
  }
  std::string report() const {
    char line[128];
    std::snprintf(line, sizeof line, "bytes=%llu fnv1a64=%016llx most_buffered=%zu\n",
                  static_cast<unsigned long long>(bytes), static_cast<unsigned long long>(hash),
                  most_buffered);
    return line;
  }
};

Loop* the_loop = nullptr;

Task<void> upload(http::Request& request, http::Responder responder) {
  const long delay_ms = std::strtol(request.query("delay_ms").value_or("0").c_str(), nullptr, 10);
  http::BodyReader body = request.body_reader();
  Checksum sum;
  while (true) {
    std::string chunk = co_await body.read_some();  // CancelledError if the client leaves.
    if (chunk.empty()) break;                       // The end of the body.
    sum.most_buffered = std::max(sum.most_buffered, chunk.size());
    sum.add(chunk);
    if (delay_ms > 0) co_await sleep(*the_loop, std::chrono::milliseconds(delay_ms));
  }
  const std::string report = sum.report();
  responder.send(200, "text/plain", report);
  std::printf("upload: %s", report.c_str());
  std::fflush(stdout);
}

void upload_with_callbacks(http::Request& request, http::Responder responder) {
  auto sum = std::make_shared<Checksum>();
  http::BodyReader body = request.body_reader();
  body.on_end([responder, sum] {
        const std::string report = sum->report();
        responder.send(200, "text/plain", report);
        std::printf("upload-callbacks: %s", report.c_str());
        std::fflush(stdout);
      })
      .on_error([responder](const http::BodyError& error) {
        // The connection has answered the client (413, 408, ...) or is gone.
        std::printf("upload-callbacks failed: %s\n", error.what());
        std::fflush(stdout);
      })
      .on_data([sum](std::string_view chunk) {
        sum->most_buffered = std::max(sum->most_buffered, chunk.size());
        sum->add(chunk);
      });
}

}  // namespace

int main(int argc, char** argv) {
  std::uint16_t port = 8083;
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
  the_loop = &loop;
  http::Router router;
  router.add("POST", "/upload", &upload, http::BodyMode::stream);
  router.add("PUT", "/upload", &upload, http::BodyMode::stream);
  router.add("POST", "/upload-callbacks", &upload_with_callbacks, http::BodyMode::stream);
  http::ServerOptions options;
  options.limits.max_body_bytes = std::size_t{4} << 30;  // Streamed: the size costs no memory.
  options.timeouts.body = std::chrono::seconds(60);
  http::Server server(loop, std::make_shared<const http::Router>(std::move(router)), options);
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

// In-process tests of streamed responses with back-pressure: a real Server on a real loop, a
// blocking client on a thread that stops reading, reads again or leaves.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#include "http/http_test_client.hpp"
#include "squall/core/loop.hpp"
#include "squall/core/task.hpp"
#include "squall/http/router.hpp"
#include "squall/http/server.hpp"

using namespace squall;
using namespace std::chrono_literals;

namespace {

constexpr std::size_t kHighWater = 64 * 1024;
constexpr std::size_t kChunk = 16 * 1024;
constexpr std::size_t kTotal = 24 * 1024 * 1024;  // Far more than the kernel buffers hold.

// A blocking client with a small receive buffer, so the server's socket fills early.
class SlowClient {
 public:
  explicit SlowClient(std::uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    const int receive_buffer = 16 * 1024;
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &receive_buffer, sizeof receive_buffer);
    timeval timeout{5, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
      throw std::runtime_error("connect failed");
    }
  }
  ~SlowClient() { close(); }
  SlowClient(const SlowClient&) = delete;
  SlowClient& operator=(const SlowClient&) = delete;
  void send(const std::string& bytes) { ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL); }
  // Reads until the chunked body's last chunk; returns how many 'x' body bytes arrived.
  std::size_t read_to_end() {
    std::size_t body_bytes = 0;
    std::string tail;
    char buffer[64 * 1024];
    while (true) {
      const ssize_t n = ::recv(fd_, buffer, sizeof buffer, 0);
      if (n <= 0) return body_bytes;
      body_bytes += static_cast<std::size_t>(std::count(buffer, buffer + n, 'x'));
      tail.append(buffer, static_cast<std::size_t>(n));
      if (tail.size() > 16) tail.erase(0, tail.size() - 16);
      if (tail.ends_with("\r\n0\r\n\r\n")) return body_bytes;
    }
  }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

struct Progress {
  std::atomic<std::size_t> written{0};     // Body bytes the handler queued.
  std::atomic<int> waits{0};               // Times it found the connection not writable.
  std::atomic<std::size_t> max_unsent{0};  // The most unsent bytes it saw after a write.
  std::atomic<bool> cancelled{false};      // drained() threw CancelledError.
  std::atomic<bool> finished{false};       // The whole body was queued.
};

Progress* progress = nullptr;  // The test's; set before serving.

Task<void> stream_out(http::Request&, http::Responder responder) {
  responder.start(200, "application/octet-stream");
  const std::string chunk(kChunk, 'x');
  try {
    while (progress->written < kTotal) {
      if (!responder.write(chunk)) co_return;
      progress->written += chunk.size();
      progress->max_unsent = std::max<std::size_t>(progress->max_unsent, responder.unsent_bytes());
      if (!responder.writable()) {
        ++progress->waits;
        co_await responder.drained();
      }
    }
  } catch (const CancelledError&) {
    progress->cancelled = true;
    throw;
  }
  progress->finished = true;
  responder.finish();
}

// Streams through the callback form: writes until not writable, then on_drain.
void stream_with_callbacks(http::Responder responder) {
  static const std::string chunk(kChunk, 'x');
  while (progress->written < kTotal) {
    if (!responder.write(chunk)) return;
    progress->written += chunk.size();
    progress->max_unsent = std::max<std::size_t>(progress->max_unsent, responder.unsent_bytes());
    if (!responder.writable()) {
      ++progress->waits;
      responder.on_drain([responder] {
        if (responder.connected()) stream_with_callbacks(responder);
      });
      return;
    }
  }
  progress->finished = true;
  responder.finish();
}

bool wait_until(const std::function<bool()>& condition) {
  const auto deadline = std::chrono::steady_clock::now() + 5s;
  while (!condition()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

void serve(http::Router& router, const std::function<void(std::uint16_t)>& client) {
  Loop loop;
  http::ServerOptions options;
  options.limits.write_buffer_high_water = kHighWater;
  squall::testing::serve_while(loop, router, client, options);
}

const std::string kGet = "GET /stream HTTP/1.1\r\nHost: t\r\n\r\n";

// The writer stopped after the client stopped reading: its count stays put for a while.
void check_suspended() {
  REQUIRE(wait_until([] { return progress->waits > 0; }));
  const std::size_t written = progress->written;
  std::this_thread::sleep_for(200ms);  // Checks that nothing happens: no event to await.
  CHECK(progress->written == written);
  CHECK(written < kTotal);
}

}  // namespace

TEST_CASE("a streamed response suspends while the client does not read and resumes when it does") {
  Progress state;
  progress = &state;
  http::Router router;
  router.add("GET", "/stream", &stream_out);
  std::size_t received = 0;
  serve(router, [&](std::uint16_t port) {
    SlowClient client(port);
    client.send(kGet);
    check_suspended();
    received = client.read_to_end();
  });
  CHECK(state.finished);
  CHECK(received == kTotal);
  CHECK(state.written == kTotal);
  // Unsent bytes stay near the high-water mark (without back-pressure: all 24 MiB).
  CHECK(state.max_unsent.load() <= kHighWater + 2 * kChunk);
  CHECK(state.waits > 1);
  progress = nullptr;
}

TEST_CASE("a streamed response waiting for its client is cancelled when the client leaves") {
  Progress state;
  progress = &state;
  http::Router router;
  router.add("GET", "/stream", &stream_out);
  serve(router, [&](std::uint16_t port) {
    SlowClient client(port);
    client.send(kGet);
    REQUIRE(wait_until([] { return progress->waits > 0; }));
    client.close();  // Unread input: the kernel resets the connection.
    CHECK(wait_until([] { return progress->cancelled.load(); }));
  });
  CHECK(state.cancelled);
  CHECK_FALSE(state.finished);
  progress = nullptr;
}

TEST_CASE("a callback streamer waits with on_drain and stays bounded") {
  Progress state;
  progress = &state;
  http::Router router;
  router.add("GET", "/stream", [](http::Request&, http::Responder responder) {
    responder.start(200, "application/octet-stream");
    stream_with_callbacks(std::move(responder));
  });
  std::size_t received = 0;
  serve(router, [&](std::uint16_t port) {
    SlowClient client(port);
    client.send(kGet);
    check_suspended();
    received = client.read_to_end();
  });
  CHECK(state.finished);
  CHECK(received == kTotal);
  CHECK(state.max_unsent.load() <= kHighWater + 2 * kChunk);
  progress = nullptr;
}

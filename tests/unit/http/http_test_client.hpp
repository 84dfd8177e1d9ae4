// The blocking test client of the in-process HTTP tests: it runs on the test's own thread
// while the server runs on the loop, sends raw bytes and reads what comes back.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

#include <doctest/doctest.h>

#include "squall/core/loop.hpp"
#include "squall/http/router.hpp"
#include "squall/http/server.hpp"

namespace squall::testing {

// A blocking client socket for the client thread.
class Client {
 public:
  explicit Client(std::uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    timeval timeout{5, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
      throw std::runtime_error("connect failed");
    }
  }
  ~Client() { close(); }
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  void send(const std::string& bytes) { ::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL); }
  int fd() const noexcept { return fd_; }
  // Reads until `marker` has been seen `count` times, the peer closes, or 5 s pass.
  std::string read_until(const std::string& marker, int count = 1) {
    while (occurrences(marker) < count) {
      char chunk[4096];
      const ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
      if (n <= 0) break;
      received_.append(chunk, static_cast<std::size_t>(n));
    }
    return received_;
  }
  std::string read_all() { return read_until("\x01never\x02", 1); }
  // One whole response with Content-Length framing (the tests' responses are small); bytes
  // after it stay for the next call.
  std::string read_response() {
    while (true) {
      const auto head_end = received_.find("\r\n\r\n");
      if (head_end != std::string::npos) {
        const auto length_at = received_.find("Content-Length: ");
        if (length_at != std::string::npos && length_at < head_end) {
          const std::size_t end = head_end + 4 + std::stoul(received_.substr(length_at + 16));
          if (received_.size() >= end) {
            std::string response = received_.substr(0, end);
            received_.erase(0, end);
            return response;
          }
        }
      }
      char chunk[4096];
      const ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
      if (n <= 0) return std::exchange(received_, std::string());
      received_.append(chunk, static_cast<std::size_t>(n));
    }
  }

 private:
  int occurrences(const std::string& marker) const {
    int found = 0;
    for (auto at = received_.find(marker); at != std::string::npos;
         at = received_.find(marker, at + marker.size())) {
      ++found;
    }
    return found;
  }
  int fd_ = -1;
  std::string received_;
};

// Serves `router` on `loop` while `client(port)` runs on a thread, then closes every connection
// and the loop; a watchdog stops the loop after `watchdog` if the client hangs.
inline void serve_while(Loop& loop, http::Router& router,
                        const std::function<void(std::uint16_t)>& client,
                        http::ServerOptions options = {},
                        std::chrono::seconds watchdog = std::chrono::seconds(20)) {
  {
    http::Server server(loop, std::make_shared<const http::Router>(router), options);
    server.listen("127.0.0.1", 0);
    const std::uint16_t port = server.listeners().front()->bound_port();
    std::thread thread([&] {
      client(port);
      loop.call_soon([&] {
        server.close_all();
        loop.stop();
      });
    });
    const auto timer = loop.call_later(watchdog, [&] {
      server.close_all();
      loop.stop();
    });
    loop.run();
    loop.cancel(timer);
    thread.join();
  }
  CHECK(loop.close() == 0);
}

}  // namespace squall::testing

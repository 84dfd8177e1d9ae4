// A listening TCP socket on one address (IPv4 or IPv6), accepting without blocking.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <uv.h>

#include "squall/core/loop.hpp"

namespace squall::net {

class Listener {
 public:
  // Called for each connection ready to accept (status 0) or an accept error (UV_EMFILE...).
  using OnConnection = std::function<void(uv_stream_t* server, int status)>;

  // Binds and listens. Throws std::system_error naming the address and the reason.
  Listener(Loop& loop, const std::string& host, std::uint16_t port, int backlog,
           OnConnection on_connection);
  // Adopts `fd`, a socket that is already bound and listening (systemd socket activation).
  // Throws std::system_error naming the descriptor and the reason.
  Listener(Loop& loop, int fd, int backlog, OnConnection on_connection);
  ~Listener();
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;

  // The address actually bound: "127.0.0.1:41234", "[::1]:8080".
  const std::string& bound_address() const noexcept { return bound_address_; }
  std::uint16_t bound_port() const noexcept { return bound_port_; }
  // Stops accepting and closes the socket; the destructor does the same.
  void close() noexcept;

 private:
  struct State;
  std::unique_ptr<State> state_;  // The socket and the accept callback.
  void start_listening(int backlog, const std::string& display);

  std::string bound_address_;  // Filled from getsockname after bind.
  std::uint16_t bound_port_ = 0;
};

// Formats a socket address as "1.2.3.4:80" / "[::1]:80" (with_port) or the bare host.
std::string format_address(const sockaddr_storage& address, bool with_port);

}  // namespace squall::net

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
  // Stops accepting and closes the socket; the destructor does the same. Connections still
  // waiting in the socket's accept queue are reset by the kernel: accept_waiting() first.
  void close() noexcept;
  // Takes one connection from the socket's accept queue now, bypassing libuv (which accepts only
  // when the loop polls): a drain or reload empties the queue with it before close(). Returns
  // the connection's descriptor (non-blocking, close-on-exec) or -errno: -EAGAIN once the queue
  // is empty, -EBADF once closed. Loop thread.
  int accept_waiting() noexcept;
  // The socket's descriptor, -1 once closed.
  int descriptor() const noexcept;

 private:
  struct State;
  std::unique_ptr<State> state_;  // The socket and the accept callback.
  void start_listening(int backlog, const std::string& display);

  std::string bound_address_;  // Filled from getsockname after bind.
  std::uint16_t bound_port_ = 0;
};

// Opens a TCP socket for `host:port` with SO_REUSEPORT set before bind (libuv 1.44 has no flag
// for it), bound and listening, for several loops to share one address: each adopts its own
// socket (Listener's descriptor constructor) and the kernel spreads new connections over them.
// Port 0 picks a free port: open the first socket with it, the others with the port it got
// (bound_port). With `first` and a fixed port, the address is first bound once without the
// option, so that another process already listening there is an error ("address already in
// use") rather than a silent share of its traffic. Returns the descriptor (non-blocking,
// close-on-exec); throws std::system_error naming the address and the reason.
int open_reuseport_socket(const std::string& host, std::uint16_t port, int backlog, bool first);
// Makes the kernel hand every new connection of `fd`'s SO_REUSEPORT group to the group's first
// socket (the first one that started listening: open_reuseport_socket's `first`), with a
// classic BPF program attached to the group (SO_ATTACH_REUSEPORT_CBPF, Linux 4.5; no privilege
// needed). Before the other sockets of the group close, so that no connection is queued on them
// between their last accept and their close (the kernel resets what a closing listener still
// queues, unless net.ipv4.tcp_migrate_req is set). Returns 0 or -errno.
int steer_reuseport_group_to_first(int fd) noexcept;
// The port a bound socket has (0 if getsockname fails).
std::uint16_t bound_port(int fd) noexcept;

// Formats a socket address as "1.2.3.4:80" / "[::1]:80" (with_port) or the bare host; "?" for
// a family other than IPv4 and IPv6.
std::string format_address(const sockaddr_storage& address, bool with_port);

}  // namespace squall::net

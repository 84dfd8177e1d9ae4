#include "squall/net/listener.hpp"

#include <arpa/inet.h>
#include <linux/filter.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <iterator>
#include <system_error>

#include "squall/core/uv_handle.hpp"

namespace squall::net {

struct Listener::State {
  UvHandle<uv_tcp_t> handle;   // handle.data points here.
  OnConnection on_connection;  // The owner's accept logic.
};

namespace {

// An IPv4 address in host byte order, in dotted decimal as inet_ntop writes it. By hand:
// uv_ip4_name and inet_ntop go through snprintf, about 1,800 instructions for what takes a few
// dozen, and a handler may ask for the address of every request.
void append_ipv4(std::string& out, std::uint32_t address) {
  char text[16];
  char* end = text;
  for (int shift = 24; shift >= 0; shift -= 8) {
    const unsigned octet = (address >> shift) & 0xff;
    if (octet >= 100) *end++ = static_cast<char>('0' + octet / 100);
    if (octet >= 10) *end++ = static_cast<char>('0' + octet / 10 % 10);
    *end++ = static_cast<char>('0' + octet % 10);
    if (shift != 0) *end++ = '.';
  }
  out.append(text, static_cast<std::size_t>(end - text));
}

}  // namespace

std::string format_address(const sockaddr_storage& address, bool with_port) {
  std::string text;
  std::uint16_t port = 0;
  if (address.ss_family == AF_INET) {
    const auto& v4 = reinterpret_cast<const sockaddr_in&>(address);
    append_ipv4(text, ntohl(v4.sin_addr.s_addr));
    port = ntohs(v4.sin_port);
  } else if (address.ss_family == AF_INET6) {
    const auto& v6 = reinterpret_cast<const sockaddr_in6&>(address);
    char host[INET6_ADDRSTRLEN] = "?";
    uv_ip6_name(&v6, host, sizeof host);
    port = ntohs(v6.sin6_port);
    if (with_port) return "[" + std::string(host) + "]:" + std::to_string(port);
    text = host;
  } else {
    text = "?";
  }
  if (with_port) text.append(":").append(std::to_string(port));
  return text;
}

namespace {

// A TCP socket of the address's family with SO_REUSEADDR (as libuv sets it), IPV6_V6ONLY for v6
// (as Listener binds) and, if `reuse_port`, SO_REUSEPORT; bound. -errno on failure.
int bind_socket(const sockaddr_storage& address, bool reuse_port) {
  const int fd = ::socket(address.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  const int on = 1;
  bool ok = ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) == 0;
  if (ok && reuse_port) ok = ::setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &on, sizeof on) == 0;
  if (ok && address.ss_family == AF_INET6) {
    ok = ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof on) == 0;
  }
  const socklen_t length =
      address.ss_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in);
  if (ok) ok = ::bind(fd, reinterpret_cast<const sockaddr*>(&address), length) == 0;
  if (!ok) {
    const int error = errno;
    ::close(fd);
    return -error;
  }
  return fd;
}

}  // namespace

int open_reuseport_socket(const std::string& host, std::uint16_t port, int backlog, bool first) {
  const bool v6 = host.find(':') != std::string::npos;
  const std::string display =
      v6 ? "[" + host + "]:" + std::to_string(port) : host + ":" + std::to_string(port);
  auto fail = [&](int error, const char* what) {
    // what() appends ": " and the reason (strerror) to the message.
    throw std::system_error(error, std::generic_category(), std::string(what) + " " + display);
  };
  sockaddr_storage address{};
  const int parsed = v6 ? uv_ip6_addr(host.c_str(), port, reinterpret_cast<sockaddr_in6*>(&address))
                        : uv_ip4_addr(host.c_str(), port, reinterpret_cast<sockaddr_in*>(&address));
  if (parsed < 0) fail(-parsed, "cannot parse listen address");
  if (first && port != 0) {
    // Sockets with SO_REUSEPORT share an address with any other such socket of the same user:
    // a second squalld would quietly take half the connections. A plain bind fails instead.
    const int probe = bind_socket(address, false);
    if (probe < 0) fail(-probe, "cannot bind");
    ::close(probe);
  }
  const int fd = bind_socket(address, true);
  if (fd < 0) fail(-fd, "cannot bind");
  if (::listen(fd, backlog) != 0) {
    const int error = errno;
    ::close(fd);
    fail(error, "cannot listen on");
  }
  return fd;
}

int steer_reuseport_group_to_first(int fd) noexcept {
  // "ret #0": the index, in the group, of the socket to receive the connection.
  sock_filter code[] = {{BPF_RET | BPF_K, 0, 0, 0}};
  const sock_fprog program{static_cast<unsigned short>(std::size(code)), code};
  if (::setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &program, sizeof program) != 0) {
    return -errno;
  }
  return 0;
}

std::uint16_t bound_port(int fd) noexcept {
  sockaddr_storage bound{};
  socklen_t length = sizeof bound;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &length) != 0) return 0;
  return ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6&>(bound).sin6_port
                                           : reinterpret_cast<sockaddr_in&>(bound).sin_port);
}

Listener::Listener(Loop& loop, const std::string& host, std::uint16_t port, int backlog,
                   OnConnection on_connection)
    : state_(std::make_unique<State>()) {
  state_->on_connection = std::move(on_connection);
  state_->handle = UvHandle<uv_tcp_t>(loop, state_.get(), uv_tcp_init, "listening socket");
  const bool v6 = host.find(':') != std::string::npos;
  const std::string display =
      v6 ? "[" + host + "]:" + std::to_string(port) : host + ":" + std::to_string(port);
  auto fail = [&](int status, const char* what) {
    close();
    throw std::system_error(-status, std::generic_category(),
                            std::string(what) + " " + display + ": " + uv_strerror(status));
  };
  sockaddr_storage address{};
  int status = v6 ? uv_ip6_addr(host.c_str(), port, reinterpret_cast<sockaddr_in6*>(&address))
                  : uv_ip4_addr(host.c_str(), port, reinterpret_cast<sockaddr_in*>(&address));
  if (status < 0) fail(status, "cannot parse listen address");
  // IPV6ONLY keeps "[::]:80" from also claiming IPv4, so both may be listed side by side.
  status = uv_tcp_bind(state_->handle.get(), reinterpret_cast<const sockaddr*>(&address),
                       v6 ? UV_TCP_IPV6ONLY : 0);
  if (status < 0) fail(status, "cannot bind");
  start_listening(backlog, display);
}

Listener::Listener(Loop& loop, int fd, int backlog, OnConnection on_connection)
    : state_(std::make_unique<State>()) {
  state_->on_connection = std::move(on_connection);
  state_->handle = UvHandle<uv_tcp_t>(loop, state_.get(), uv_tcp_init, "listening socket");
  const std::string display = "inherited descriptor " + std::to_string(fd);
  int accepting = 0;
  socklen_t length = sizeof accepting;
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &accepting, &length) != 0 || accepting == 0) {
    close();
    throw std::system_error(ENOTSOCK, std::generic_category(),
                            display + " is not a listening socket");
  }
  const int status = uv_tcp_open(state_->handle.get(), fd);
  if (status < 0) {
    close();
    throw std::system_error(-status, std::generic_category(),
                            "cannot adopt " + display + ": " + uv_strerror(status));
  }
  // listen() again on a listening socket only updates its backlog.
  start_listening(backlog, display);
}

void Listener::start_listening(int backlog, const std::string& display) {
  const int status =
      uv_listen(state_->handle.stream(), backlog, [](uv_stream_t* server, int accept_status) {
        auto* listening = static_cast<State*>(server->data);
        listening->on_connection(server, accept_status);
      });
  if (status < 0) {
    close();
    throw std::system_error(-status, std::generic_category(),
                            "cannot listen on " + display + ": " + uv_strerror(status));
  }
  sockaddr_storage bound{};
  int length = sizeof bound;
  uv_tcp_getsockname(state_->handle.get(), reinterpret_cast<sockaddr*>(&bound), &length);
  bound_address_ = format_address(bound, true);
  bound_port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6&>(bound).sin6_port
                                                  : reinterpret_cast<sockaddr_in&>(bound).sin_port);
}

void Listener::close() noexcept {
  // The state (and the accept callback) stays until the Listener is destroyed, so a callback
  // may close its own listener.
  state_->handle.close();
}

int Listener::accept_waiting() noexcept {
  const int fd = descriptor();
  if (fd < 0) return -EBADF;
  for (;;) {
    const int accepted = ::accept4(fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (accepted >= 0) return accepted;
    // EWOULDBLOCK is EAGAIN on Linux.
    if (errno != EINTR) return -errno;
  }
}

int Listener::descriptor() const noexcept {
  if (!state_->handle.is_open()) return -1;
  uv_os_fd_t fd = -1;
  if (uv_fileno(state_->handle.handle(), &fd) != 0) return -1;
  return fd;
}

// The socket closes (or, after Loop::close(), is freed) with the state.
Listener::~Listener() = default;

}  // namespace squall::net

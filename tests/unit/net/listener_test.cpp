#include "squall/net/listener.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <system_error>
#include <vector>

#include <doctest/doctest.h>

#include "core/handle_lifetime.hpp"

using namespace squall;

TEST_CASE("a Listener binds port 0 and reports the port it got") {
  Loop loop;
  net::Listener listener(loop, "127.0.0.1", 0, 16, [](uv_stream_t*, int) {});
  CHECK(listener.bound_port() != 0);
  CHECK(listener.bound_address() == "127.0.0.1:" + std::to_string(listener.bound_port()));
  listener.close();
  listener.close();  // Harmless.
  CHECK(loop.close() == 0);
}

TEST_CASE("a Listener is freed, never closed twice, whether it or its loop ends first") {
  // Loop::close() then ~Listener leaked the listener's state before (LeakSanitizer).
  testing::check_every_end_order([](Loop& loop) {
    return std::make_unique<net::Listener>(loop, "127.0.0.1", 0, 16, [](uv_stream_t*, int) {});
  });
  testing::check_every_end_order([](Loop& loop) {
    auto listener =
        std::make_unique<net::Listener>(loop, "127.0.0.1", 0, 16, [](uv_stream_t*, int) {});
    listener->close();  // Closed by its owner, destroyed later.
    return listener;
  });
}

TEST_CASE("a Listener that cannot bind throws naming the address and frees its socket") {
  Loop loop;
  CHECK_THROWS_WITH_AS(net::Listener(loop, "not-an-address", 80, 16, [](uv_stream_t*, int) {}),
                       doctest::Contains("cannot parse listen address not-an-address:80"),
                       std::system_error);
  CHECK(loop.close() == 0);
}

// net::open_reuseport_socket: several sockets on one address for several loops.

TEST_CASE("SO_REUSEPORT sockets share one port; a plain bind there is refused") {
  const int first = net::open_reuseport_socket("127.0.0.1", 0, 16, true);
  const std::uint16_t port = net::bound_port(first);
  REQUIRE(port != 0);
  const int second = net::open_reuseport_socket("127.0.0.1", port, 16, false);
  CHECK(net::bound_port(second) == port);
  // `first` with a fixed port binds once without the option: another process's sockets (or
  // these) make it fail instead of sharing their connections.
  try {
    const int third = net::open_reuseport_socket("127.0.0.1", port, 16, true);
    ::close(third);
    FAIL("a first socket joined an address already in use");
  } catch (const std::system_error& error) {
    CHECK(std::string(error.what()) ==
          "cannot bind 127.0.0.1:" + std::to_string(port) + ": Address already in use");
  }
  ::close(second);
  ::close(first);
  CHECK_THROWS_WITH_AS(net::open_reuseport_socket("127.0.0.1.5", 0, 16, true),
                       doctest::Contains("cannot parse listen address 127.0.0.1.5:0"),
                       std::system_error);
  const int v6 = net::open_reuseport_socket("::1", 0, 16, true);
  CHECK(net::bound_port(v6) != 0);
  ::close(v6);
}

namespace {

// A blocking connect to 127.0.0.1:port; the kernel completes it whether anyone accepts or not.
int connect_to(std::uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in address{};
  uv_ip4_addr("127.0.0.1", port, &address);
  REQUIRE(::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0);
  return fd;
}

// How many connections wait in a listening socket's queue (accepts them all, then closes them).
int accept_all(int listening) {
  int count = 0;
  for (;;) {
    const int fd = ::accept4(listening, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      CHECK(errno == EAGAIN);
      return count;
    }
    ::close(fd);
    ++count;
  }
}

}  // namespace

TEST_CASE("Listener::accept_waiting takes the queued connections without the loop, then EAGAIN") {
  Loop loop;
  net::Listener listener(loop, "127.0.0.1", 0, 16, [](uv_stream_t*, int) {});
  REQUIRE(listener.descriptor() >= 0);
  std::vector<int> clients;
  for (int i = 0; i < 3; ++i) clients.push_back(connect_to(listener.bound_port()));
  for (int i = 0; i < 3; ++i) {
    const int fd = listener.accept_waiting();
    REQUIRE(fd >= 0);
    CHECK((::fcntl(fd, F_GETFL) & O_NONBLOCK) != 0);
    ::close(fd);
  }
  CHECK(listener.accept_waiting() == -EAGAIN);
  listener.close();
  CHECK(listener.descriptor() == -1);
  CHECK(listener.accept_waiting() == -EBADF);
  for (int fd : clients) ::close(fd);
  CHECK(loop.close() == 0);
}

TEST_CASE("a steered SO_REUSEPORT group queues every new connection on its first socket") {
  const int first = net::open_reuseport_socket("127.0.0.1", 0, 64, true);
  const std::uint16_t port = net::bound_port(first);
  const int second = net::open_reuseport_socket("127.0.0.1", port, 64, false);
  // Unsteered, the kernel spreads connections by hash: 32 all on one socket would be a 2^-31
  // chance.
  std::vector<int> clients;
  for (int i = 0; i < 32; ++i) clients.push_back(connect_to(port));
  const int on_first = accept_all(first);
  CHECK(on_first > 0);
  CHECK(accept_all(second) == 32 - on_first);
  // Steered through any socket of the group: all on the first.
  REQUIRE(net::steer_reuseport_group_to_first(second) == 0);
  for (int i = 0; i < 32; ++i) clients.push_back(connect_to(port));
  CHECK(accept_all(second) == 0);
  CHECK(accept_all(first) == 32);
  for (int fd : clients) ::close(fd);
  ::close(second);
  ::close(first);
  // Not a SO_REUSEPORT socket: an error, nothing else.
  const int plain = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  CHECK(net::steer_reuseport_group_to_first(plain) < 0);
  ::close(plain);
}

namespace {

sockaddr_storage ipv4_address(std::uint32_t host_order, std::uint16_t port) {
  sockaddr_storage storage{};
  auto& v4 = reinterpret_cast<sockaddr_in&>(storage);
  v4.sin_family = AF_INET;
  v4.sin_addr.s_addr = htonl(host_order);
  v4.sin_port = htons(port);
  return storage;
}

std::string inet_ntop_text(std::uint32_t host_order) {
  const in_addr address{htonl(host_order)};
  char text[INET_ADDRSTRLEN];
  REQUIRE(inet_ntop(AF_INET, &address, text, sizeof text) != nullptr);
  return text;
}

}  // namespace

TEST_CASE("format_address writes IPv4 as inet_ntop does, with and without the port") {
  std::vector<std::uint32_t> addresses = {0x00000000, 0xffffffff, 0x7f000001, 0x0a000001,
                                          0xc0000201, 0x01020304, 0x0a0b0c0d, 0x64646464,
                                          0x09636465, 0x630a6409, 0xc0a80001, 0x08080808};
  // Every octet value in every position, then random addresses.
  for (std::uint32_t octet = 0; octet < 256; ++octet) {
    for (int shift = 0; shift < 32; shift += 8) addresses.push_back(octet << shift | 0x01010101);
  }
  std::mt19937 random(20261130);
  for (int i = 0; i < 20000; ++i) addresses.push_back(static_cast<std::uint32_t>(random()));
  for (const std::uint32_t address : addresses) {
    const std::string expected = inet_ntop_text(address);
    CAPTURE(expected);
    CHECK(squall::net::format_address(ipv4_address(address, 0), false) == expected);
    CHECK(squall::net::format_address(ipv4_address(address, 8080), true) == expected + ":8080");
  }
  CHECK(squall::net::format_address(ipv4_address(0x7f000001, 65535), true) == "127.0.0.1:65535");
}

TEST_CASE("format_address writes IPv6 in brackets with the port, and '?' for another family") {
  sockaddr_storage storage{};
  auto& v6 = reinterpret_cast<sockaddr_in6&>(storage);
  v6.sin6_family = AF_INET6;
  v6.sin6_addr = in6addr_loopback;
  v6.sin6_port = htons(443);
  CHECK(squall::net::format_address(storage, true) == "[::1]:443");
  CHECK(squall::net::format_address(storage, false) == "::1");
  REQUIRE(inet_pton(AF_INET6, "::ffff:192.0.2.7", &v6.sin6_addr) == 1);
  CHECK(squall::net::format_address(storage, false) == "::ffff:192.0.2.7");
  sockaddr_storage unix_family{};
  unix_family.ss_family = AF_UNIX;
  CHECK(squall::net::format_address(unix_family, false) == "?");
  CHECK(squall::net::format_address(unix_family, true) == "?:0");
}

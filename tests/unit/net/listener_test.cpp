// net::open_reuseport_socket: several sockets on one address for several loops.
#include "squall/net/listener.hpp"

#include <unistd.h>

#include <doctest/doctest.h>

#include <string>
#include <system_error>

using namespace squall;

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

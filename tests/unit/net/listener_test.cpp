#include "squall/net/listener.hpp"

#include <unistd.h>

#include <memory>
#include <string>
#include <system_error>

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

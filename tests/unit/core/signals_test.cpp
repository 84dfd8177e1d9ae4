#include "squall/core/signals.hpp"

#include <csignal>
#include <memory>
#include <stdexcept>

#include <doctest/doctest.h>

#include "core/handle_lifetime.hpp"

using namespace squall;

TEST_CASE("a SignalWatcher runs its callback on the loop for a delivered signal") {
  Loop loop;
  int deliveries = 0;
  SignalWatcher watcher(loop, SIGUSR2, [&] {
    ++deliveries;
    loop.stop();
  });
  const auto watchdog = loop.call_later(std::chrono::seconds(10), [&] { loop.stop(); });
  std::raise(SIGUSR2);
  loop.run();
  loop.cancel(watchdog);
  CHECK(deliveries == 1);
  CHECK(loop.close() == 0);
}

TEST_CASE("a SignalWatcher closes its handle once, whether it or its loop ends first") {
  testing::check_every_end_order(
      [](Loop& loop) { return std::make_unique<SignalWatcher>(loop, SIGUSR2, [] {}); });
}

TEST_CASE("a SignalWatcher on a closed loop is refused") {
  Loop loop;
  CHECK(loop.close() == 0);
  CHECK_THROWS_AS(SignalWatcher(loop, SIGUSR2, [] {}), std::logic_error);
}

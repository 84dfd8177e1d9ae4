#include "squall/core/loop_lag.hpp"

#include <chrono>
#include <memory>

#include <doctest/doctest.h>

#include "core/handle_lifetime.hpp"

using namespace squall;
using namespace std::chrono_literals;

TEST_CASE("the loop lag monitor samples on its timer") {
  Loop loop;
  int samples = 0;
  LoopLagMonitor monitor(loop, 1ms, [&](double lag) {
    CHECK(lag >= 0);
    if (++samples == 3) loop.stop();
  });
  const auto watchdog = loop.call_later(10s, [&] { loop.stop(); });
  loop.run();
  loop.cancel(watchdog);
  CHECK(samples == 3);
  monitor.stop();
  monitor.stop();  // Harmless.
  CHECK(monitor.last_lag_seconds() == 0);
  CHECK(loop.close() == 0);
}

TEST_CASE("the loop lag monitor closes its timer once, whether it or its loop ends first") {
  testing::check_every_end_order(
      [](Loop& loop) { return std::make_unique<LoopLagMonitor>(loop, 1ms, [](double) {}); });
}

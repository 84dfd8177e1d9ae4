#include "squall/core/loop_lag.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>

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

TEST_CASE("the last lag is read from another thread while the loop thread stops the monitor") {
  // squalld's primary loop reads every worker's figure while a worker may be stopping its
  // monitor: the read touches only an atomic of the monitor, never the state stop() frees
  // (ThreadSanitizer reports the race otherwise).
  Loop loop;
  double largest = 0;
  LoopLagMonitor monitor(loop, 1ms, [&](double lag) { largest = std::max(largest, lag); });
  std::atomic<bool> done{false};
  std::atomic<std::uint64_t> reads{0};
  std::thread reader([&] {
    while (!done.load()) {
      if (monitor.last_lag_seconds() >= 0) reads.fetch_add(1);
    }
  });
  // A loop blocked for 30 ms: the next sample is about that late.
  loop.call_later(5ms, [] { std::this_thread::sleep_for(30ms); });
  loop.call_later(80ms, [&] {
    monitor.stop();
    loop.stop();
  });
  loop.run();
  CHECK(monitor.last_lag_seconds() == 0);
  done.store(true);
  reader.join();
  CHECK(largest >= 0.02);
  CHECK(reads.load() > 0);
  CHECK(loop.close() == 0);
}

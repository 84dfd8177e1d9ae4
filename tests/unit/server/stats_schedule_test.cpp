#include "server/jobs_service.hpp"

#include <doctest/doctest.h>

#include <chrono>

using namespace std::chrono_literals;
using squall::squalld::next_stats_read;

TEST_CASE("statistics reads: every 2 s, spaced to 0.5% of the time, at least every 5 minutes") {
  // A small store: a read of a millisecond or less, every 2 s as always.
  CHECK(next_stats_read(0ns) == 2000ms);
  CHECK(next_stats_read(400us) == 2000ms);
  CHECK(next_stats_read(10ms) == 2000ms);
  // A backlog (about 200,000 waiting jobs took 40 ms here): idle 200 times as long.
  CHECK(next_stats_read(11ms) == 2200ms);
  CHECK(next_stats_read(40ms) == 8000ms);
  CHECK(next_stats_read(1500us) == 2000ms);  // Rounded up to 2 ms: 400 ms, under the 2 s.
  // Millions: the counts still come every 5 minutes.
  CHECK(next_stats_read(2s) == 300000ms);
  CHECK(next_stats_read(1h) == 300000ms);
}

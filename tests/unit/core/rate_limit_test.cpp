#include "squall/core/rate_limit.hpp"

#include <doctest/doctest.h>

using squall::KeyedRateLimiter;
using squall::TokenBucket;
using namespace std::chrono_literals;

TEST_CASE("a token bucket allows its burst, then one request per interval") {
  const auto start = TokenBucket::Clock::time_point{} + 1h;
  TokenBucket bucket(2.0, 3.0, start);  // 2 per second, 3 at once.
  std::chrono::milliseconds wait{0};
  CHECK(bucket.try_take(start, wait));
  CHECK(bucket.try_take(start, wait));
  CHECK(bucket.try_take(start, wait));
  CHECK_FALSE(bucket.try_take(start, wait));
  CHECK(wait == 500ms);
  CHECK_FALSE(bucket.try_take(start + 250ms, wait));
  CHECK(wait == 250ms);
  CHECK(bucket.try_take(start + 500ms, wait));
  CHECK_FALSE(bucket.full(start + 500ms));
  CHECK(bucket.full(start + 2s));
  // Never more than the burst, however long it was idle.
  CHECK(bucket.try_take(start + 1h, wait));
  CHECK(bucket.try_take(start + 1h, wait));
  CHECK(bucket.try_take(start + 1h, wait));
  CHECK_FALSE(bucket.try_take(start + 1h, wait));
}

TEST_CASE("keyed limiter: one key's flood leaves another key served") {
  const auto now = TokenBucket::Clock::time_point{} + 1h;
  KeyedRateLimiter limiter(60.0, 2.0);  // 1 per second, 2 at once.
  std::chrono::milliseconds wait{0};
  CHECK(limiter.try_take("flood", now, wait));
  CHECK(limiter.try_take("flood", now, wait));
  for (int i = 0; i < 100; ++i) CHECK_FALSE(limiter.try_take("flood", now, wait));
  CHECK(wait == 1000ms);
  CHECK(limiter.try_take("quiet", now, wait));
  CHECK(limiter.try_take("flood", now + 1s, wait));
}

TEST_CASE("keyed limiter forgets idle keys once it holds too many") {
  auto now = TokenBucket::Clock::time_point{} + 1h;
  KeyedRateLimiter limiter(60.0, 1.0, 10);
  std::chrono::milliseconds wait{0};
  for (int i = 0; i < 10; ++i) limiter.try_take("a" + std::to_string(i), now, wait);
  CHECK(limiter.size() == 10);
  // All ten are empty now: nothing can be forgotten, the table grows past its bound.
  limiter.try_take("b", now, wait);
  CHECK(limiter.size() == 11);
  // Refilled buckets are forgotten when a new key arrives.
  now += 2s;
  limiter.try_take("c", now, wait);
  CHECK(limiter.size() == 1);
  // A forgotten key starts full again, as it would have been.
  CHECK(limiter.try_take("a0", now, wait));
}

TEST_CASE("client addresses are limited by IPv4 address and by IPv6 /64") {
  using squall::client_rate_key;
  CHECK(client_rate_key("192.0.2.7") == "192.0.2.7");
  CHECK(client_rate_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd") == "2001:db8:1:2::/64");
  CHECK(client_rate_key("2001:db8:1:2::1") == client_rate_key("2001:db8:1:2:ffff::9"));
  CHECK(client_rate_key("2001:db8:1:3::1") != client_rate_key("2001:db8:1:2::1"));
  CHECK(client_rate_key("::1") == "::/64");
  CHECK(client_rate_key("::ffff:192.0.2.7") == "::ffff:192.0.2.7");
  CHECK(client_rate_key("") == "");
}

// Token buckets: a rate with a burst, per key (an API token, a client address). Loop thread
// only (no locking); time is passed in, so tests need no clock.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>

namespace squall {

// `burst` requests at once, then one every 1/rate. Starts full.
class TokenBucket {
 public:
  using Clock = std::chrono::steady_clock;

  TokenBucket(double per_second, double burst, Clock::time_point now) noexcept;

  // Takes one token if there is one. Otherwise returns false and sets `retry_after` to the
  // time until one is there.
  bool try_take(Clock::time_point now, std::chrono::milliseconds& retry_after) noexcept;
  // Whether the bucket is full at `now` (an idle key that can be forgotten).
  bool full(Clock::time_point now) const noexcept;

 private:
  void refill(Clock::time_point now) noexcept;

  double per_second_;       // Tokens added per second.
  double burst_;            // The bucket's size.
  double tokens_;           // Tokens in it at last_.
  Clock::time_point last_;  // When tokens_ was computed.
};

// One bucket per key, all with the same rate. Keys whose bucket is full again are forgotten
// once the table grows past `max_keys`, so a stream of new addresses costs bounded memory; if
// every bucket is in use, the table may exceed it until they refill.
class KeyedRateLimiter {
 public:
  using Clock = TokenBucket::Clock;

  KeyedRateLimiter(double per_minute, double burst, std::size_t max_keys = 100'000);

  // Takes one token from `key`'s bucket (see TokenBucket::try_take).
  bool try_take(std::string_view key, Clock::time_point now,
                std::chrono::milliseconds& retry_after);
  // Buckets kept now.
  std::size_t size() const noexcept { return buckets_.size(); }

 private:
  void prune(Clock::time_point now);

  double per_second_;                                     // The rate of every bucket.
  double burst_;                                          // The size of every bucket.
  std::size_t max_keys_;                                  // Pruning starts above it.
  std::unordered_map<std::string, TokenBucket> buckets_;  // By key.
};

// The key under which a client address is rate limited: an IPv4 address as it is, an IPv6
// address by its /64 ("2001:db8:1:2::/64"), since one host commonly holds a whole /64 and could
// otherwise rotate through it. Anything else is returned unchanged.
std::string client_rate_key(std::string_view numeric_address);

}  // namespace squall

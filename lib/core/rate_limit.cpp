#include "squall/core/rate_limit.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace squall {

TokenBucket::TokenBucket(double per_second, double burst, Clock::time_point now) noexcept
    : per_second_(per_second), burst_(std::max(burst, 1.0)), tokens_(burst_), last_(now) {}

void TokenBucket::refill(Clock::time_point now) noexcept {
  if (now <= last_) return;
  const double elapsed = std::chrono::duration<double>(now - last_).count();
  tokens_ = std::min(burst_, tokens_ + elapsed * per_second_);
  last_ = now;
}

bool TokenBucket::try_take(Clock::time_point now, std::chrono::milliseconds& retry_after) noexcept {
  refill(now);
  if (tokens_ >= 1.0) {
    tokens_ -= 1.0;
    return true;
  }
  const double seconds = per_second_ > 0 ? (1.0 - tokens_) / per_second_ : 3600.0;
  retry_after = std::chrono::milliseconds(static_cast<std::int64_t>(std::ceil(seconds * 1000)));
  return false;
}

bool TokenBucket::full(Clock::time_point now) const noexcept {
  const double elapsed = now > last_ ? std::chrono::duration<double>(now - last_).count() : 0.0;
  return tokens_ + elapsed * per_second_ >= burst_;
}

KeyedRateLimiter::KeyedRateLimiter(double per_minute, double burst, std::size_t max_keys)
    : per_second_(per_minute / 60.0), burst_(burst), max_keys_(max_keys) {}

bool KeyedRateLimiter::try_take(std::string_view key, Clock::time_point now,
                                std::chrono::milliseconds& retry_after) {
  auto found = buckets_.find(std::string(key));
  if (found == buckets_.end()) {
    if (buckets_.size() >= max_keys_) prune(now);
    found = buckets_.emplace(std::string(key), TokenBucket(per_second_, burst_, now)).first;
  }
  return found->second.try_take(now, retry_after);
}

void KeyedRateLimiter::prune(Clock::time_point now) {
  // A full bucket behaves exactly like a new one, so forgetting it changes nothing.
  std::erase_if(buckets_, [now](const auto& entry) { return entry.second.full(now); });
}

std::string client_rate_key(std::string_view numeric_address) {
  char text[INET6_ADDRSTRLEN] = {};
  if (numeric_address.size() >= sizeof text ||
      numeric_address.find(':') == std::string_view::npos) {
    return std::string(numeric_address);
  }
  std::memcpy(text, numeric_address.data(), numeric_address.size());
  in6_addr v6{};
  // An IPv4 client of a dual-stack socket (::ffff:192.0.2.1) is limited by its own address.
  if (inet_pton(AF_INET6, text, &v6) != 1 || IN6_IS_ADDR_V4MAPPED(&v6)) {
    return std::string(numeric_address);
  }
  std::memset(v6.s6_addr + 8, 0, 8);
  char prefix[INET6_ADDRSTRLEN] = {};
  if (inet_ntop(AF_INET6, &v6, prefix, sizeof prefix) == nullptr) {
    return std::string(numeric_address);
  }
  return std::string(prefix) + "/64";
}

}  // namespace squall

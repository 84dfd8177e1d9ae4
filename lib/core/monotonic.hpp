// The monotonic clock in nanoseconds: std::chrono::steady_clock, which is CLOCK_MONOTONIC, the
// clock uv_hrtime() reads, without uv_hrtime()'s two wrappers around it. The request path reads
// it twice per request.
#pragma once

#include <chrono>
#include <cstdint>

namespace squall::detail {

inline std::uint64_t monotonic_ns() noexcept {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::steady_clock::now().time_since_epoch())
                                        .count());
}

}  // namespace squall::detail

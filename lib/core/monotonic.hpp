// The monotonic clock in nanoseconds, as uv_hrtime() reads it (CLOCK_MONOTONIC), asked of the
// vDSO directly: uv_hrtime() wraps the same call in two more, and the request path reads the
// clock twice per request.
#pragma once

#include <time.h>

#include <cstdint>

namespace squall::detail {

inline std::uint64_t monotonic_ns() noexcept {
  timespec now;
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<std::uint64_t>(now.tv_sec) * 1'000'000'000u +
         static_cast<std::uint64_t>(now.tv_nsec);
}

}  // namespace squall::detail

// Equality of the short strings the request path compares on every request (a route's method
// and pattern against the request's): word loads in line instead of a call into libc's memcmp,
// which costs more than the compare itself below a few dozen bytes.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

namespace squall::http::detail {

inline bool short_equal(std::string_view a, std::string_view b) noexcept {
  const std::size_t n = a.size();
  if (n != b.size()) return false;
  const char* x = a.data();
  const char* y = b.data();
  if (n >= 8) {
    // Whole words, then the last word again (overlapping) for the rest.
    std::uint64_t u;
    std::uint64_t v;
    for (std::size_t i = 0; i + 8 <= n; i += 8) {
      std::memcpy(&u, x + i, 8);
      std::memcpy(&v, y + i, 8);
      if (u != v) return false;
    }
    std::memcpy(&u, x + n - 8, 8);
    std::memcpy(&v, y + n - 8, 8);
    return u == v;
  }
  if (n >= 4) {
    // The first four bytes and the last four (overlapping when n < 8).
    std::uint32_t u;
    std::uint32_t v;
    std::uint32_t s;
    std::uint32_t t;
    std::memcpy(&u, x, 4);
    std::memcpy(&v, y, 4);
    std::memcpy(&s, x + n - 4, 4);
    std::memcpy(&t, y + n - 4, 4);
    return ((u ^ v) | (s ^ t)) == 0;
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (x[i] != y[i]) return false;
  }
  return true;
}

}  // namespace squall::http::detail

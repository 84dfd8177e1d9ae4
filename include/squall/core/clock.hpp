// Clocks: the HTTP Date header, formatted at most once a second.
#pragma once

#include <array>
#include <ctime>
#include <string_view>

namespace squall {

// "Sat, 21 Nov 2026 14:03:32 GMT" for the current second. Not thread-safe: one per loop.
class HttpDateCache {
 public:
  std::string_view now() noexcept;
  // The second the text of the last now() is for (-1 before the first call).
  std::time_t second() const noexcept { return cached_second_; }
  // Formats `seconds` (since the epoch) as an IMF-fixdate; exposed for tests.
  static std::string_view format(std::time_t seconds, std::array<char, 32>& out) noexcept;

 private:
  std::time_t cached_second_ = -1;  // The second text_ was formatted for.
  std::array<char, 32> text_{};     // NUL-terminated IMF-fixdate.
  std::size_t length_ = 0;          // Length of text_ without the NUL.
};

}  // namespace squall

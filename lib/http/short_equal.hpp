// Word loads for the request path: equality of the short strings it compares on every request
// (a route's method and pattern against the request's, the remembered Host) in line instead of
// a call into libc's memcmp, which costs more than the compare itself below a few dozen bytes,
// and the fixed compares of the fast head reader.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

namespace squall::http::detail {

// The sizeof(Word) bytes at `p` as one word, in memory order (any alignment).
template <typename Word>
Word load_word(const char* p) noexcept {
  Word word;
  std::memcpy(&word, p, sizeof word);
  return word;
}

inline bool short_equal(std::string_view a, std::string_view b) noexcept {
  const std::size_t n = a.size();
  if (n != b.size()) return false;
  const char* x = a.data();
  const char* y = b.data();
  // Loads of the first and the last bytes overlap when n is not a multiple of their width, so
  // every byte is compared with at most two loads a side up to 16 bytes.
  const auto word = load_word<std::uint64_t>;
  const auto half = load_word<std::uint32_t>;
  if (n >= 8) {
    for (std::size_t i = 0; i + 16 <= n; i += 8) {
      if (word(x + i) != word(y + i)) return false;
    }
    return ((word(x + n - 8) ^ word(y + n - 8)) |
            (word(x + (n >= 16 ? n - 16 : 0)) ^ word(y + (n >= 16 ? n - 16 : 0)))) == 0;
  }
  if (n >= 4) return ((half(x) ^ half(y)) | (half(x + n - 4) ^ half(y + n - 4))) == 0;
  // 0 to 3 bytes: the first, the middle and the last cover them all.
  return n == 0 || (x[0] == y[0] && x[n / 2] == y[n / 2] && x[n - 1] == y[n - 1]);
}

}  // namespace squall::http::detail

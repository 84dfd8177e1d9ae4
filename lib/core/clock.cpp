#include "squall/core/clock.hpp"

#include "core/hot.hpp"

namespace squall {

std::string_view HttpDateCache::format(std::time_t seconds, std::array<char, 32>& out) noexcept {
  std::tm utc{};
  gmtime_r(&seconds, &utc);
  // strftime's %a and %b follow the C locale, which squalld never changes.
  const std::size_t length =
      std::strftime(out.data(), out.size(), "%a, %d %b %Y %H:%M:%S GMT", &utc);
  return {out.data(), length};
}

SQUALL_HOT std::string_view HttpDateCache::now() noexcept {
  const std::time_t second = std::time(nullptr);
  if (second != cached_second_) {
    cached_second_ = second;
    length_ = format(second, text_).size();
  }
  return {text_.data(), length_};
}

}  // namespace squall

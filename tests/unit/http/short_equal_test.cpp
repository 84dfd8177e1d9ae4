// short_equal against std::string_view's == at every length and every differing position.
#include "http/short_equal.hpp"

#include <doctest/doctest.h>

#include <string>

TEST_CASE("short_equal agrees with == at every length and every differing byte") {
  const std::string text = "/plaintext/jobs/0123456789abcdef/GET/HEAD";
  for (std::size_t length = 0; length <= text.size(); ++length) {
    const std::string a = text.substr(0, length);
    std::string b = a;
    CAPTURE(length);
    CHECK(squall::http::detail::short_equal(a, b));
    for (std::size_t position = 0; position < length; ++position) {
      for (const char flip : {'\x01', '\x20', '\x80'}) {
        b[position] = static_cast<char>(a[position] ^ flip);
        CAPTURE(position);
        CHECK_FALSE(squall::http::detail::short_equal(a, b));
        b[position] = a[position];
      }
    }
    // A prefix or an extension is not equal, whatever the bytes they share.
    if (length > 0) CHECK_FALSE(squall::http::detail::short_equal(a, a.substr(0, length - 1)));
    CHECK_FALSE(squall::http::detail::short_equal(a, a + "x"));
  }
}

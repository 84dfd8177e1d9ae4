// The checks a Responder applies to header names and values.
#include "squall/http/response.hpp"

#include <doctest/doctest.h>

#include <string>

using namespace squall;

namespace {

// RFC 9110's field-value without obs-text rules, as the Responder enforces it: no control byte
// but HTAB, no DEL. Byte by byte, the definition is_header_value must agree with.
bool reference_header_value(const std::string& value) {
  for (const char c : value) {
    const auto byte = static_cast<unsigned char>(c);
    if ((byte < 0x20 && c != '\t') || byte == 0x7f) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("is_header_value refuses control bytes but HTAB, and DEL, at every position") {
  // Long enough for the sixteen-byte steps and the bytes after them.
  const std::string clean = "application/json; charset=utf-8 /jobs/0123456789abcdef";
  for (std::size_t length = 0; length <= clean.size(); ++length) {
    CHECK(http::is_header_value(clean.substr(0, length)));
  }
  for (std::size_t position = 0; position < 40; ++position) {
    for (int byte = 0; byte < 256; ++byte) {
      std::string value = clean.substr(0, 40);
      value[position] = static_cast<char>(byte);
      CAPTURE(position);
      CAPTURE(byte);
      CHECK(http::is_header_value(value) == reference_header_value(value));
    }
  }
  CHECK(http::is_header_value("a\tb"));
  CHECK_FALSE(http::is_header_value("a\r\nInjected: yes"));
  CHECK(http::is_header_value("caf\xc3\xa9"));  // Bytes from 0x80 pass through as they are.
}

TEST_CASE("is_header_name takes tokens only") {
  CHECK(http::is_header_name("Location"));
  CHECK(http::is_header_name("X-Request-Id"));
  CHECK(http::is_header_name("!#$%&'*+-.^_`|~09azAZ"));
  CHECK_FALSE(http::is_header_name(""));
  CHECK_FALSE(http::is_header_name("Bad Name"));
  CHECK_FALSE(http::is_header_name("Bad:Name"));
  CHECK_FALSE(http::is_header_name("Bad\r\nName"));
}

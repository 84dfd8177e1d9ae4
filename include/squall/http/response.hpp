// Pieces of a response head: reason phrases and the checks that keep headers well-formed.
#pragma once

#include <string_view>

namespace squall::http {

// "OK" for 200, "Not Found" for 404; "Unknown" for a code without a registered phrase.
std::string_view reason_phrase(int status) noexcept;

// Whether `name` is a non-empty HTTP token (RFC 9110 §5.6.2).
bool is_header_name(std::string_view name) noexcept;

// Whether `value` holds no CR, LF, NUL or other control character except HTAB.
bool is_header_value(std::string_view value) noexcept;

}  // namespace squall::http

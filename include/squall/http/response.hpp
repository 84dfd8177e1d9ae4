// A whole response as a value (what a `Task<Response>(const Request&)` handler returns, see
// router.hpp), and pieces of a response head: reason phrases and the checks that keep headers
// well-formed.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace squall::http {

// A whole response, sent with Content-Length framing by Responder::send(const Response&):
//
//   co_return http::Response(200, "application/json", body).header("Cache-Control", "no-store");
//
// Header names and values are checked when it is sent: one that is not an HTTP token, or a value
// holding CR, LF or another control character, makes the send throw std::invalid_argument (in a
// handler: a 500 and a log line naming the header).
struct Response {
  int status = 200;
  std::string content_type = "text/plain";
  std::string body;
  std::vector<std::pair<std::string, std::string>> headers;  // Extra lines, in order.

  Response() = default;
  Response(int status_code, std::string type, std::string content)
      : status(status_code), content_type(std::move(type)), body(std::move(content)) {}

  // Adds a header line; chains on an lvalue or on a temporary.
  Response& header(std::string name, std::string value) & {
    headers.emplace_back(std::move(name), std::move(value));
    return *this;
  }
  Response&& header(std::string name, std::string value) && {
    headers.emplace_back(std::move(name), std::move(value));
    return std::move(*this);
  }
};

// "OK" for 200, "Not Found" for 404; "Unknown" for a code without a registered phrase.
std::string_view reason_phrase(int status) noexcept;

// Whether `name` is a non-empty HTTP token (RFC 9110 §5.6.2).
bool is_header_name(std::string_view name) noexcept;

// Whether `value` holds no CR, LF, NUL or other control character except HTAB.
bool is_header_value(std::string_view value) noexcept;

}  // namespace squall::http

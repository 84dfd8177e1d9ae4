// A parsed HTTP/1.x request. Its views point into the connection's read buffer and stay valid
// until the request's response is finished; copy anything a handler keeps longer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "squall/http/body_reader.hpp"

namespace squall::http {

struct Header {
  std::string_view name;   // As sent; compare case-insensitively.
  std::string_view value;  // Without surrounding whitespace.
};

// A route parameter such as `id` in /jobs/{id}: views into Request::path().
struct RouteParam {
  std::string_view name;
  std::string_view value;
};

bool iequals(std::string_view a, std::string_view b) noexcept;

// Decodes %XX escapes (and '+' as a space when `plus_is_space`). Returns nullopt for a bad
// escape or an encoded NUL byte.
std::optional<std::string> percent_decode(std::string_view text, bool plus_is_space);
// The same into `out` (cleared first, capacity reused). Returns false on a bad escape or NUL.
bool percent_decode_into(std::string_view text, bool plus_is_space, std::string& out);

class Connection;
class ConnectionContext;

class Request {
 public:
  std::string_view method() const noexcept { return method_; }
  // The request-target as sent: origin-form "/a?b", absolute-form "http://h/a?b", or "*".
  std::string_view target() const noexcept { return target_; }
  // The percent-decoded path, "/" for an absolute-form target without one.
  std::string_view path() const noexcept { return path_; }
  // The raw query string after '?', without decoding.
  std::string_view raw_query() const noexcept { return raw_query_; }
  // The decoded value of the first query parameter named `name`.
  std::optional<std::string> query(std::string_view name) const;
  // All query parameters, decoded, in order.
  std::vector<std::pair<std::string, std::string>> query_params() const;

  // The first header named `name` (case-insensitive), or nullopt.
  std::optional<std::string_view> header(std::string_view name) const noexcept;
  const std::vector<Header>& headers() const noexcept { return headers_; }

  // The whole body, for a route with BodyMode::buffered (empty for a streamed one).
  std::string_view body() const noexcept { return body_; }
  // The body as it arrives, for a route with BodyMode::stream; for a buffered body, a reader
  // that gives the whole body as one chunk. Every call returns a handle on the same reader.
  BodyReader body_reader() const;
  int http_major() const noexcept { return http_major_; }
  int http_minor() const noexcept { return http_minor_; }

  // The value of route parameter `name`, or an empty view.
  std::string_view param(std::string_view name) const noexcept;
  const std::vector<RouteParam>& params() const noexcept { return params_; }

  // The id of the connection that carried this request (also in log lines).
  std::uint64_t connection_id() const noexcept;
  // The peer's address, "127.0.0.1" or "::1".
  std::string_view remote_address() const;

 private:
  friend class RequestParser;
  friend class ConnectionContext;
  friend class Connection;
  friend struct detail::BodyStream;

  void clear() noexcept;
  void relocate(const char* old_begin, const char* old_end, std::ptrdiff_t delta) noexcept;

  std::string_view method_;           // A static string from llhttp_method_name().
  std::string_view target_;           // Into the read buffer.
  std::string_view path_;             // Into the read buffer, or into decoded_path_.
  std::string_view raw_query_;        // Into the read buffer.
  std::string decoded_path_;          // Used only when the path has escapes; capacity is reused.
  std::vector<Header> headers_;       // Into the read buffer; capacity is reused.
  std::vector<RouteParam> params_;    // Into path_; set by the router.
  std::string body_;                  // Copied out of the read buffer; capacity is reused.
  int http_major_ = 1;                // From the request line.
  int http_minor_ = 1;                // From the request line.
  Connection* connection_ = nullptr;  // The carrying connection.
  // The state of body_reader(), once asked for or when the body streams.
  mutable std::shared_ptr<detail::BodyStream> body_stream_;
};

}  // namespace squall::http

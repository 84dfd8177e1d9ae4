#include "http/parser.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <cstring>
#include <new>

#include "core/hot.hpp"
#include "http/fast_head.hpp"
#include "http/short_equal.hpp"

namespace squall::http {

namespace {

constexpr std::size_t kRequestLineAllowance = 64;  // Method, spaces and version around the URL.
// A body buffer up to this size is kept for the next message; a larger one is freed.
constexpr std::size_t kRetainedBodyCapacity = 64 * 1024;
// The first allocation for a body of unknown or large size; it then doubles as bytes arrive,
// so a declared Content-Length reserves nothing until its bytes come.
constexpr std::size_t kInitialBodyCapacity = 16 * 1024;

bool is_digit(char c) noexcept {
  return c >= '0' && c <= '9';
}

bool is_hex_digit(char c) noexcept {
  return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

bool is_alpha(char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

// unreserved / sub-delims of RFC 3986 2.3 and 2.2.
bool is_unreserved_or_sub_delim(char c) noexcept {
  return is_alpha(c) || is_digit(c) || (c != '\0' && std::strchr("-._~!$&'()*+,;=", c) != nullptr);
}

// IPv6address of RFC 3986 3.2.2, checked by inet_pton.
bool is_ipv6_address(std::string_view text) noexcept {
  char copy[INET6_ADDRSTRLEN + 1];
  if (text.empty() || text.size() >= sizeof copy) return false;
  std::memcpy(copy, text.data(), text.size());
  copy[text.size()] = '\0';
  in6_addr address{};
  return inet_pton(AF_INET6, copy, &address) == 1;
}

// IPvFuture = "v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" ).
bool is_ipvfuture(std::string_view text) noexcept {
  if (text.size() < 4 || (text[0] != 'v' && text[0] != 'V')) return false;
  std::size_t i = 1;
  while (i < text.size() && is_hex_digit(text[i])) ++i;
  if (i == 1 || i >= text.size() || text[i] != '.') return false;
  if (++i == text.size()) return false;
  for (; i < text.size(); ++i) {
    if (!is_unreserved_or_sub_delim(text[i]) && text[i] != ':') return false;
  }
  return true;
}

// Host = uri-host [ ":" port ] (RFC 9112 3.2, RFC 3986 3.2.2): an IP-literal in brackets or a
// reg-name (which covers IPv4address), then optional digits after one colon. An empty value is
// allowed (a target without an authority).
bool is_valid_host(std::string_view value) noexcept {
  std::string_view rest = value;
  if (!rest.empty() && rest.front() == '[') {
    const auto close = rest.find(']');
    if (close == std::string_view::npos) return false;
    const std::string_view literal = rest.substr(1, close - 1);
    if (!is_ipv6_address(literal) && !is_ipvfuture(literal)) return false;
    rest.remove_prefix(close + 1);
  } else {
    while (!rest.empty() && rest.front() != ':') {
      if (rest.front() == '%') {
        if (rest.size() < 3 || !is_hex_digit(rest[1]) || !is_hex_digit(rest[2])) return false;
        rest.remove_prefix(3);
        continue;
      }
      if (!is_unreserved_or_sub_delim(rest.front())) return false;
      rest.remove_prefix(1);
    }
  }
  if (rest.empty()) return true;
  if (rest.front() != ':') return false;
  rest.remove_prefix(1);
  return std::all_of(rest.begin(), rest.end(), is_digit);
}

// The Host checks of on_header_value_complete(), for a value that is not the remembered one; a
// value that passes becomes the remembered one when it fits. Out of line, so that the comparison
// in known_valid_host() is inlined.
template <std::size_t N>
[[gnu::noinline]] bool check_and_remember_host(std::string_view host, std::array<char, N>& last,
                                               std::size_t& last_size) noexcept {
  if (!detail::is_simple_host(host) &&
      (host.find_first_of(", \t") != std::string_view::npos || !is_valid_host(host))) {
    return false;
  }
  if (host.size() <= last.size()) {
    std::memcpy(last.data(), host.data(), host.size());
    last_size = host.size();
  }
  return true;
}

// Extends `view` with the next piece of the same span. Pieces of one span arrive in order and,
// because the connection reads into one buffer, each continues the previous in memory.
void append_piece(std::string_view& view, const char* at, std::size_t length) noexcept {
  if (view.empty()) {
    view = std::string_view(at, length);
  } else {
    view = std::string_view(view.data(), view.size() + length);
  }
}

std::string_view trim_trailing_whitespace(std::string_view value) noexcept {
  while (!value.empty() && (value.back() == ' ' || value.back() == '\t')) value.remove_suffix(1);
  return value;
}

}  // namespace

// The trampolines: one static table, each finding the RequestParser from llhttp_t::data.
struct ParserCallbacks {
  static RequestParser& self(llhttp_t* parser) noexcept {
    return *static_cast<RequestParser*>(parser->data);
  }
  static int message_begin(llhttp_t* p) noexcept { return self(p).on_message_begin(); }
  static int method(llhttp_t* p, const char* at, std::size_t n) noexcept {
    return self(p).on_method(at, n);
  }
  static int url(llhttp_t* p, const char* at, std::size_t n) noexcept {
    return self(p).on_url(at, n);
  }
  static int header_field(llhttp_t* p, const char* at, std::size_t n) noexcept {
    return self(p).on_header_field(at, n);
  }
  static int header_field_complete(llhttp_t* p) noexcept {
    return self(p).on_header_field_complete();
  }
  static int header_value(llhttp_t* p, const char* at, std::size_t n) noexcept {
    return self(p).on_header_value(at, n);
  }
  static int header_value_complete(llhttp_t* p) noexcept {
    return self(p).on_header_value_complete();
  }
  static int headers_complete(llhttp_t* p) noexcept { return self(p).on_headers_complete(); }
  static int body(llhttp_t* p, const char* at, std::size_t n) noexcept {
    return self(p).on_body(at, n);
  }
  static int chunk_header(llhttp_t* p) noexcept { return self(p).on_chunk_header(); }
  static int chunk_extension(llhttp_t* p, const char* at, std::size_t n) noexcept {
    return self(p).on_chunk_extension(at, n);
  }
  static int message_complete(llhttp_t* p) noexcept { return self(p).on_message_complete(); }
  static int url_complete(llhttp_t* p) noexcept { return self(p).on_url_complete(); }

  static llhttp_settings_t make() noexcept {
    llhttp_settings_t settings;
    llhttp_settings_init(&settings);
    settings.on_message_begin = message_begin;
    settings.on_method = method;
    settings.on_url = url;
    settings.on_url_complete = url_complete;
    settings.on_header_field = header_field;
    settings.on_header_field_complete = header_field_complete;
    settings.on_header_value = header_value;
    settings.on_header_value_complete = header_value_complete;
    settings.on_headers_complete = headers_complete;
    settings.on_body = body;
    settings.on_chunk_header = chunk_header;
    settings.on_chunk_extension_name = chunk_extension;
    settings.on_chunk_extension_value = chunk_extension;
    settings.on_message_complete = message_complete;
    return settings;
  }
};

namespace {
const llhttp_settings_t kSettings = ParserCallbacks::make();
}  // namespace

RequestParser::RequestParser(const Limits& limits, MemoryBudget* body_budget) noexcept
    : limits_(&limits), body_budget_(body_budget) {
  // No llhttp_set_lenient_* call anywhere: every lenient flag stays off.
  llhttp_init(&parser_, HTTP_REQUEST, &kSettings);
  parser_.data = this;
}

int RequestParser::fail(int status, std::string_view reason) noexcept {
  error_status_ = status;
  error_reason_ = reason;
  return HPE_USER;
}

SQUALL_HOT FeedResult RequestParser::feed(const char* data, std::size_t length) noexcept {
  if (error_status_ != 0) return {ParseEvent::error, 0};
  // A whole head of the simplest form at the start of a message skips llhttp, and so does its
  // body when all of it came with the head (take_simple_head). llhttp skips empty lines between
  // messages without starting one (and may have taken a CR whose LF is owed): those bytes go to
  // llhttp; any other first byte starts a message there as here. After a message without
  // keep-alive llhttp reads no further message, and neither does this path.
  if (fast_head_ && phase_ == ParsePhase::idle && !pending_cr_ && !after_last_message_ &&
      length > 0 && *data != '\r' && *data != '\n' && take_simple_head(data, length)) {
    return {ParseEvent::message_complete, static_cast<std::size_t>(scan_from_ - data)};
  }
  scan_from_ = data;
  llhttp_used_ = true;
  const llhttp_errno_t err = llhttp_execute(&parser_, data, length);
  const char* end = err == HPE_OK ? data + length : llhttp_get_error_pos(&parser_);
  const auto consumed = static_cast<std::size_t>(end - data);
  if (error_status_ != 0) return {ParseEvent::error, consumed};  // fail() from a callback.
  if (err != HPE_OK && err != HPE_PAUSED) {
    error_status_ = err == HPE_INVALID_VERSION ? 505 : 400;
    error_reason_ = llhttp_get_error_reason(&parser_);
    return {ParseEvent::error, consumed};
  }
  if (!scan_for_bare_cr(end)) return {ParseEvent::error, consumed};
  if (err == HPE_PAUSED) {
    if (phase_ == ParsePhase::complete) return {ParseEvent::message_complete, consumed};
    return {expect_continue_ ? ParseEvent::expect_continue : ParseEvent::body_begins, consumed};
  }
  // A head that is still incomplete is measured in raw bytes too, so whitespace that no
  // callback reports cannot grow it without bound.
  if (phase_ == ParsePhase::head && message_start_ != nullptr) {
    const auto raw_head_bytes = static_cast<std::size_t>(end - message_start_);
    if (raw_head_bytes >
        limits_->max_url_bytes + limits_->max_header_bytes + kRequestLineAllowance) {
      fail(431, "request head larger than max_url_bytes + max_header_bytes");
      return {ParseEvent::error, consumed};
    }
  }
  return {ParseEvent::need_more, consumed};
}

bool RequestParser::scan_for_bare_cr(const char* end) noexcept {
  // llhttp 8.1 takes a CR that no LF follows as a line end (CVE-2023-30589 class); every byte
  // outside body data must keep CR and LF paired.
  for (const char* p = scan_from_; p < end; ++p) {
    if (chunk_crlf_expected_ > 0) {
      // llhttp 8.1 skips the two bytes after chunk data without looking at them.
      const char expected = chunk_crlf_expected_ == 2 ? '\r' : '\n';
      if (*p != expected) {
        fail(400, "chunk data not followed by CRLF");
        return false;
      }
      --chunk_crlf_expected_;
      pending_cr_ = chunk_crlf_expected_ == 1;
      continue;
    }
    if (pending_cr_) {
      if (*p != '\n') {
        fail(400, "CR without LF in the request framing");
        return false;
      }
      pending_cr_ = false;
      continue;
    }
    p = static_cast<const char*>(std::memchr(p, '\r', static_cast<std::size_t>(end - p)));
    if (p == nullptr) break;
    pending_cr_ = true;
  }
  scan_from_ = end;
  return true;
}

void RequestParser::continue_after_expect() noexcept {
  expect_continue_ = false;
  llhttp_resume(&parser_);
}

void RequestParser::stream_body_into(std::string* queue) noexcept {
  body_sink_ = BodySink::queue;
  body_queue_ = queue;
}

void RequestParser::discard_body() noexcept {
  body_sink_ = BodySink::discard;
  body_queue_ = nullptr;
}

std::int64_t RequestParser::body_bytes_left() const noexcept {
  if (declared_length_ < 0) return -1;
  return declared_length_ - static_cast<std::int64_t>(body_received_);
}

SQUALL_HOT void RequestParser::reset() noexcept {
  release_body_budget();
  // A parser that only took fast-path heads has llhttp's state of a new parser already.
  if (llhttp_used_) llhttp_reset(&parser_);
  llhttp_used_ = false;
  request_ = nullptr;
  phase_ = ParsePhase::idle;
  message_start_ = views_end_ = value_end_ = scan_from_ = nullptr;
  pending_cr_ = false;
  after_last_message_ = false;
  error_status_ = 0;
  error_reason_ = {};
}

SQUALL_HOT void RequestParser::next_message() noexcept {
  if (request_ != nullptr && request_->body_.capacity() > kRetainedBodyCapacity) {
    release_body_budget();
    std::string().swap(request_->body_);
  }
  if (phase_ == ParsePhase::complete && !keep_alive_) after_last_message_ = true;
  phase_ = ParsePhase::idle;
  message_start_ = nullptr;
  views_end_ = nullptr;
  // Only llhttp pauses; after fast-path heads there is nothing to resume.
  if (llhttp_used_) llhttp_resume(&parser_);
}

SQUALL_HOT void RequestParser::release_body_budget() noexcept {
  if (body_charged_ == 0) return;
  if (body_budget_ != nullptr) body_budget_->give_back(body_charged_);
  body_charged_ = 0;
}

void RequestParser::relocate(const char* old_begin, const char* old_end,
                             std::ptrdiff_t delta) noexcept {
  if (value_end_ > old_begin && value_end_ <= old_end) value_end_ += delta;
  if (message_start_ >= old_begin && message_start_ < old_end) message_start_ += delta;
  if (views_end_ > old_begin && views_end_ <= old_end) views_end_ += delta;
  if (request_ != nullptr) request_->relocate(old_begin, old_end, delta);
}

// A head that fast_head.hpp accepts is one llhttp accepts, with the same views; what remains is
// what on_message_begin(), the header callbacks and on_headers_complete() would check and set.
// Any check that would fail leaves the head to llhttp, which refuses it with its own status.
// Inlined into feed(), its only caller: one call frame per request on the fast path.
[[gnu::always_inline]] inline bool RequestParser::take_simple_head(const char* data,
                                                                   std::size_t length) noexcept {
  begin_message();
  detail::SimpleHead head;
  Request& request = *request_;
  if (!detail::scan_simple_head(data, length, head, request.headers_) ||
      head.target.size() > limits_->max_url_bytes ||
      head.header_bytes > limits_->max_header_bytes ||
      request.headers_.size() > limits_->max_header_count || head.host_count > 1 ||
      (head.http_minor == 1 && head.host_count == 0) ||
      (head.host_count == 1 && !known_valid_host(head.host))) {
    request.headers_.clear();
    return false;
  }
  // A body is taken here only when all of it came with the head, is to be buffered and fits the
  // limits; otherwise llhttp reads the message and refuses, pauses or waits as it does.
  const std::uint64_t body_length = head.content_length;
  if (body_length > 0) {
    if (pause_before_body_ || body_length > limits_->max_body_bytes ||
        body_length > length - head.length) {
      request.headers_.clear();
      return false;
    }
    // The same charge llhttp's on_body makes for the same bytes; refused, it leaves no trace.
    if (grow_body(static_cast<std::size_t>(body_length)) != HPE_OK) {
      error_status_ = 0;
      error_reason_ = {};
      request.headers_.clear();
      return false;
    }
    request.body_.append(data + head.length, static_cast<std::size_t>(body_length));
    body_received_ = body_length;
  }
  declared_length_ = static_cast<std::int64_t>(body_length);
  request.method_ = head.method_name;
  request.http_major_ = 1;
  request.http_minor_ = head.http_minor;
  request.target_ = head.target;
  // Origin-form without escapes: the path is the target up to its first '?' (found by the scan),
  // as split_target() finds it.
  if (head.query_mark == nullptr) {
    request.path_ = head.target;
  } else {
    const char* const target_end = head.target.data() + head.target.size();
    request.path_ = std::string_view(
        head.target.data(), static_cast<std::size_t>(head.query_mark - head.target.data()));
    request.raw_query_ = std::string_view(
        head.query_mark + 1, static_cast<std::size_t>(target_end - head.query_mark - 1));
  }
  phase_ = ParsePhase::complete;
  message_start_ = data;
  views_end_ = head.views_end;
  scan_from_ = data + head.length + body_length;
  keep_alive_ = true;
  return true;
}

// The Host checks of on_header_value_complete(), remembering the last host that passed: the
// requests of one connection (and of most clients) name the same host. Inlined into
// take_simple_head(); the full checks stay out of line.
[[gnu::always_inline]] inline bool RequestParser::known_valid_host(std::string_view host) noexcept {
  return detail::short_equal(host,
                             std::string_view(last_valid_host_.data(), last_valid_host_size_)) ||
         check_and_remember_host(host, last_valid_host_, last_valid_host_size_);
}

int RequestParser::on_message_begin() noexcept {
  begin_message();
  phase_ = ParsePhase::head;
  return HPE_OK;
}

SQUALL_HOT void RequestParser::begin_message() noexcept {
  message_start_ = nullptr;
  views_end_ = nullptr;
  url_bytes_ = header_bytes_ = header_count_ = chunk_extension_bytes_ = 0;
  chunk_crlf_expected_ = 0;
  host_count_ = transfer_encoding_count_ = 0;
  in_header_field_ = in_trailers_ = expect_continue_ = expect_unsupported_ = false;
  upgrade_requested_ = keep_alive_ = false;
  body_sink_ = BodySink::buffer;
  body_queue_ = nullptr;
  body_received_ = 0;
  declared_length_ = -1;
  request_->clear();
}

int RequestParser::on_method(const char* at, std::size_t) noexcept {
  if (message_start_ == nullptr) message_start_ = at;
  return HPE_OK;
}

int RequestParser::on_url(const char* at, std::size_t length) noexcept {
  url_bytes_ += length;
  if (url_bytes_ > limits_->max_url_bytes) {
    return fail(414, "request-target longer than max_url_bytes");
  }
  append_piece(request_->target_, at, length);
  views_end_ = at + length;
  return HPE_OK;
}

int RequestParser::on_url_complete() noexcept {
  // llhttp 8.1 takes "GET /" followed by a line end as HTTP/0.9 and waits for more; the byte
  // after the target (in the buffer: llhttp has read it) tells at once.
  if (views_end_ != nullptr && (*views_end_ == '\r' || *views_end_ == '\n')) {
    return fail(400, "request line without an HTTP version (HTTP/0.9)");
  }
  return HPE_OK;
}

int RequestParser::on_header_field(const char* at, std::size_t length) noexcept {
  // llhttp 8.1 takes spaces before the colon into the name ("X-Custom : 1"); RFC 9112 5.1
  // requires a 400, since intermediaries disagree on what such a field is.
  if (std::memchr(at, ' ', length) != nullptr) {
    return fail(400, "whitespace between a header field name and its colon");
  }
  header_bytes_ += length;
  if (header_bytes_ > limits_->max_header_bytes) {
    return fail(431, in_trailers_ ? "trailers larger than max_header_bytes"
                                  : "header section larger than max_header_bytes");
  }
  if (!in_header_field_) {
    in_header_field_ = true;
    value_end_ = nullptr;
    if (++header_count_ > limits_->max_header_count) {
      return fail(431, in_trailers_ ? "more trailer lines than max_header_count"
                                    : "more header lines than max_header_count");
    }
    if (in_trailers_) return HPE_OK;
    try {
      request_->headers_.push_back(Header{std::string_view(at, length), {}});
    } catch (const std::bad_alloc&) {
      return fail(503, "out of memory for the request headers");
    }
  } else if (!in_trailers_) {
    append_piece(request_->headers_.back().name, at, length);
  }
  views_end_ = at + length;
  return HPE_OK;
}

int RequestParser::on_header_field_complete() noexcept {
  in_header_field_ = false;
  return HPE_OK;
}

int RequestParser::on_header_value(const char* at, std::size_t length) noexcept {
  header_bytes_ += length;
  if (header_bytes_ > limits_->max_header_bytes) {
    return fail(431, in_trailers_ ? "trailers larger than max_header_bytes"
                                  : "header section larger than max_header_bytes");
  }
  if (in_trailers_) return HPE_OK;
  // llhttp 8.1 reports an obs-fold continuation line as one more piece of the value, after the
  // CRLF it skipped; newer releases refuse it. Pieces of one line are contiguous in the buffer,
  // and a first piece never starts with whitespace (llhttp skips it).
  const bool continues_line =
      value_end_ == nullptr ? at[0] != ' ' && at[0] != '\t' : at == value_end_;
  if (!continues_line) return fail(400, "obsolete line folding in a header value");
  value_end_ = at + length;
  append_piece(request_->headers_.back().value, at, length);
  views_end_ = at + length;
  return HPE_OK;
}

int RequestParser::on_header_value_complete() noexcept {
  in_header_field_ = false;
  if (in_trailers_) return HPE_OK;
  Header& header = request_->headers_.back();
  header.value = trim_trailing_whitespace(header.value);
  // llhttp 8.1 accepts a header line that starts with whitespace (an obs-fold on the first
  // line) as part of the request line's aftermath; refuse any name that is not a clean token.
  if (header.name.empty() || header.name.front() == ' ' || header.name.front() == '\t') {
    return fail(400, "header line starts with whitespace (obsolete line folding)");
  }
  if (iequals(header.name, "host")) {
    ++host_count_;
    if (header.value.find_first_of(", \t") != std::string_view::npos) {
      return fail(400, "Host header holds more than one value");
    }
    if (!is_valid_host(header.value)) return fail(400, "Host header is not a valid host[:port]");
  } else if (iequals(header.name, "transfer-encoding")) {
    ++transfer_encoding_count_;
  } else if (iequals(header.name, "expect")) {
    if (iequals(header.value, "100-continue")) {
      expect_continue_ = true;
    } else {
      expect_unsupported_ = true;
    }
  }
  return HPE_OK;
}

int RequestParser::on_headers_complete() noexcept {
  Request& request = *request_;
  request.http_major_ = parser_.http_major;
  request.http_minor_ = parser_.http_minor;
  request.method_ = llhttp_method_name(static_cast<llhttp_method_t>(parser_.method));
  // llhttp 8.1 reads a request line without a version as HTTP/0.9, and any single-digit
  // version; squall speaks HTTP/1.0 and HTTP/1.1 only.
  if (parser_.http_major == 0) return fail(400, "request line without an HTTP version");
  if (parser_.http_major != 1 || parser_.http_minor > 1) {
    return fail(505, "HTTP version not supported");
  }
  const bool http11 = parser_.http_minor == 1;
  // RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing (a 1.0
  // intermediary would not have understood it); the connection must close after the answer.
  if (!http11 && transfer_encoding_count_ > 0) {
    return fail(400, "Transfer-Encoding in an HTTP/1.0 request");
  }
  if (http11 && host_count_ == 0) return fail(400, "HTTP/1.1 request without a Host header");
  if (host_count_ > 1) return fail(400, "more than one Host header");
  if (transfer_encoding_count_ > 1) return fail(400, "more than one Transfer-Encoding header");
  if ((parser_.flags & F_TRANSFER_ENCODING) && (parser_.flags & F_CONTENT_LENGTH)) {
    return fail(400, "both Content-Length and Transfer-Encoding");
  }
  if (transfer_encoding_count_ == 1 && !(parser_.flags & F_CHUNKED)) {
    return fail(400, "Transfer-Encoding whose final coding is not chunked");
  }
  if (transfer_encoding_count_ == 1) {
    // A coding before chunked (gzip, chunked) would have to be undone; squall does not.
    const auto value = request.header("transfer-encoding").value_or("");
    if (!iequals(value, "chunked")) return fail(501, "Transfer-Encoding other than chunked");
  }
  if (parser_.method == HTTP_CONNECT) return fail(501, "CONNECT is not supported");
  if (expect_unsupported_ && http11) return fail(417, "Expect value other than 100-continue");
  if ((parser_.flags & F_CONTENT_LENGTH) && parser_.content_length > limits_->max_body_bytes) {
    return fail(413, "Content-Length above max_body_bytes");
  }
  try {
    if (const int status = split_target(); status != HPE_OK) return status;
  } catch (const std::bad_alloc&) {
    return fail(503, "out of memory for the request-target");
  }

  // An Upgrade request is served as plain HTTP; the connection closes after it because the
  // client may already be speaking the other protocol.
  if (parser_.upgrade) {
    parser_.upgrade = 0;
    upgrade_requested_ = true;
  }
  phase_ = ParsePhase::body;
  const bool has_body = (parser_.flags & F_CHUNKED) || parser_.content_length > 0;
  expect_continue_ = expect_continue_ && http11 && has_body;
  if (!(parser_.flags & F_CHUNKED))
    declared_length_ = static_cast<std::int64_t>(parser_.content_length);
  // Known now already: a handler that runs before the body has arrived answers with it.
  keep_alive_ = llhttp_should_keep_alive(&parser_) != 0 && !upgrade_requested_;
  return expect_continue_ || (pause_before_body_ && has_body) ? HPE_PAUSED : HPE_OK;
}

int RequestParser::split_target() {
  Request& request = *request_;
  std::string_view target = request.target_;
  if (target == "*") {
    request.path_ = target;
    return HPE_OK;
  }
  if (target.empty()) return fail(400, "empty request-target");
  if (target.front() != '/') {
    // Absolute-form: scheme "://" authority, then the path (absent means "/").
    const auto scheme_end = target.find("://");
    const auto scheme = target.substr(0, scheme_end);
    if (scheme_end == std::string_view::npos ||
        !(iequals(scheme, "http") || iequals(scheme, "https"))) {
      return fail(400, "request-target is neither origin-form nor absolute-form");
    }
    target.remove_prefix(scheme_end + 3);
    const auto path_start = target.find_first_of("/?");
    target = path_start == std::string_view::npos ? std::string_view() : target.substr(path_start);
  }
  const auto query_start = target.find('?');
  std::string_view raw_path = target.substr(0, query_start);
  if (query_start != std::string_view::npos) request.raw_query_ = target.substr(query_start + 1);
  if (raw_path.empty()) raw_path = "/";
  if (raw_path.find('%') == std::string_view::npos) {
    request.path_ = raw_path;
    return HPE_OK;
  }
  // Decode into reused capacity; a bad escape or an encoded NUL is refused.
  if (!percent_decode_into(raw_path, /*plus_is_space=*/false, request.decoded_path_)) {
    return fail(400, "bad percent-encoding in the path");
  }
  request.path_ = request.decoded_path_;
  return HPE_OK;
}

int RequestParser::on_body(const char* at, std::size_t length) noexcept {
  // Body bytes may hold any octet: scan the framing before them, then skip them.
  if (!scan_for_bare_cr(at)) return HPE_USER;
  scan_from_ = at + length;
  // parser_.content_length is what remains of the chunk: at 0, CRLF must come next.
  if ((parser_.flags & F_CHUNKED) && parser_.content_length == 0) chunk_crlf_expected_ = 2;
  if (body_received_ + length > limits_->max_body_bytes) {
    return fail(413, "request body larger than max_body_bytes");
  }
  body_received_ += length;
  if (body_sink_ == BodySink::discard) return HPE_OK;
  if (body_sink_ == BodySink::queue) {
    try {
      body_queue_->append(at, length);
    } catch (const std::bad_alloc&) {
      return fail(503, "out of memory for the streamed request body");
    }
    return HPE_OK;
  }
  if (const int status = grow_body(length); status != HPE_OK) return status;
  request_->body_.append(at, length);  // Fits the capacity grow_body made: no allocation.
  return HPE_OK;
}

int RequestParser::grow_body(std::size_t length) noexcept {
  std::string& body = request_->body_;
  const std::size_t needed = body.size() + length;
  if (needed <= body.capacity() && body_charged_ >= body.capacity()) return HPE_OK;
  // Double as bytes arrive, never past max_body_bytes: a declared length reserves nothing.
  std::size_t capacity = std::max(body.capacity(), needed);
  if (needed > body.capacity()) {
    capacity = std::max(needed, std::min(std::max(kInitialBodyCapacity, body.capacity() * 2),
                                         limits_->max_body_bytes));
  }
  const std::size_t extra = capacity > body_charged_ ? capacity - body_charged_ : 0;
  if (body_budget_ != nullptr && !body_budget_->try_take(extra)) {
    return fail(503, "request bodies being received exceed limits.max_buffered_body_bytes");
  }
  // A refusal changes nothing but the error (take_simple_head relies on it).
  const auto refuse = [&](int status, std::string_view reason) noexcept {
    if (body_budget_ != nullptr) body_budget_->give_back(extra);
    return fail(status, reason);
  };
  try {
    body.reserve(capacity);
  } catch (const std::bad_alloc&) {
    return refuse(503, "out of memory for the request body");
  } catch (const std::length_error&) {
    return refuse(413, "request body larger than this system can hold");
  }
  body_charged_ += extra;
  return HPE_OK;
}

int RequestParser::on_chunk_header() noexcept {
  // parser_.content_length is the announced chunk size: refuse before reading the chunk.
  if (parser_.content_length > limits_->max_body_bytes - body_received_) {
    return fail(413, "chunked request body larger than max_body_bytes");
  }
  if (parser_.content_length == 0) in_trailers_ = true;
  return HPE_OK;
}

int RequestParser::on_chunk_extension(const char*, std::size_t length) noexcept {
  chunk_extension_bytes_ += length;
  if (chunk_extension_bytes_ > limits_->max_chunk_extension_bytes) {
    return fail(413, "chunk extensions larger than max_chunk_extension_bytes");
  }
  return HPE_OK;
}

int RequestParser::on_message_complete() noexcept {
  phase_ = ParsePhase::complete;
  keep_alive_ = llhttp_should_keep_alive(&parser_) != 0 && !upgrade_requested_;
  return HPE_PAUSED;
}

}  // namespace squall::http

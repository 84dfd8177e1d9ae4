// The llhttp adapter: turns bytes into Requests, enforcing squall's limits and the framing rules
// llhttp 8.1 leaves to its user (Host, obs-fold, versions, sizes). Node's node_http_parser.cc is
// the model: one static table of trampolines, views into the caller's buffer, pause per message.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <llhttp.h>

#include "squall/http/limits.hpp"
#include "squall/http/request.hpp"

namespace squall::http {

enum class ParseEvent {
  need_more,         // Everything was consumed; the message (if any) is not complete yet.
  expect_continue,   // Headers asked for "100 Continue" and the limits allow the body.
  body_begins,       // The head is complete and a body follows (only after pause_before_body).
  message_complete,  // request() holds a whole message; call next_message() after answering.
  error,             // A final error: answer error_status() and close.
};

struct FeedResult {
  ParseEvent event;
  std::size_t consumed;  // Bytes of the input that belong to what was parsed so far.
};

// Where the parser is in the current message; the connection picks its timeout from it.
enum class ParsePhase { idle, head, body, complete };

class RequestParser {
 public:
  // `limits` (and `body_budget`, when given) must outlive the parser. Body bytes are charged to
  // `body_budget` as the body's buffer grows; next_message() and release_body() give them back.
  explicit RequestParser(const Limits& limits, MemoryBudget* body_budget = nullptr) noexcept;
  RequestParser(const RequestParser&) = delete;
  RequestParser& operator=(const RequestParser&) = delete;

  // Sets the request the next message is parsed into. Required before the first feed().
  void attach(Request* request) noexcept { request_ = request; }
  Request* request() const noexcept { return request_; }

  // Parses bytes. Successive calls for one message must pass memory that continues the previous
  // call's (the connection reads into one buffer); relocate() follows a move of that buffer.
  FeedResult feed(const char* data, std::size_t length) noexcept;

  // Back to the state of a new parser (the connection borrowing it has not sent a byte yet);
  // gives the body's bytes back to the budget first.
  void reset() noexcept;

  // After expect_continue or body_begins: parsing may go on into the body.
  void continue_after_expect() noexcept;

  // Streamed request bodies. pause_before_body(true): feed() stops after a head that a body
  // follows (body_begins or expect_continue), so the connection can pick the route's body mode
  // before any body byte is taken; it holds for the messages parsed after the call.
  void pause_before_body(bool pause) noexcept { pause_before_body_ = pause; }
  // After body_begins or expect_continue: the current message's body bytes are appended to
  // `queue` instead of Request::body() (the caller charges and drains it), or dropped.
  void stream_body_into(std::string* queue) noexcept;
  void discard_body() noexcept;
  // Whether the head asked for "100 Continue" (valid at expect_continue).
  bool expect_continue() const noexcept { return expect_continue_; }
  // Body bytes of the current message received so far, in any mode.
  std::uint64_t body_bytes_received() const noexcept { return body_received_; }
  // The declared Content-Length of the current message, or -1 for a chunked body.
  std::int64_t declared_content_length() const noexcept { return declared_length_; }
  // Body bytes still to come under a Content-Length, or -1 for a chunked body.
  std::int64_t body_bytes_left() const noexcept;
  // After message_complete and its response: ready for the next message. A body buffer above
  // 64 KiB is freed and its bytes go back to the budget.
  void next_message() noexcept;
  // Gives the body's bytes back to the budget without freeing them (the connection is closing,
  // or its workspace goes back to the server, which frees a large body buffer itself).
  void release_body_budget() noexcept;
  // Bytes charged to the budget for the current body.
  std::size_t body_bytes_charged() const noexcept { return body_charged_; }

  ParsePhase phase() const noexcept { return phase_; }
  // The first byte of the current message, or nullptr before it began.
  const char* message_start() const noexcept { return message_start_; }
  // One past the last byte any of the request's views refers to; with message_start() it bounds
  // what the connection must keep of the message's head while the body streams past.
  const char* views_end() const noexcept { return views_end_; }
  // Moves every view into [old_begin, old_end) by `delta` bytes.
  void relocate(const char* old_begin, const char* old_end, std::ptrdiff_t delta) noexcept;

  // After message_complete: whether the connection may carry another request.
  bool keep_alive() const noexcept { return keep_alive_; }
  // After error: the status to answer (400, 408, 413, 414, 417, 431, 501, 503, 505) and why.
  // 503 means the server's body budget was spent (or memory ran out): retry later.
  int error_status() const noexcept { return error_status_; }
  std::string_view error_reason() const noexcept { return error_reason_; }

  const llhttp_t& llhttp() const noexcept { return parser_; }

  // Whether a whole head of the simplest form is read in one pass without llhttp (fast_head.hpp);
  // on by default. Off only to compare the two paths (tests, fuzzing).
  void set_fast_head(bool enabled) noexcept { fast_head_ = enabled; }

 private:
  friend struct ParserCallbacks;

  int fail(int status, std::string_view reason) noexcept;
  void begin_message() noexcept;
  bool take_simple_head(const char* data, std::size_t length) noexcept;
  bool known_valid_host(std::string_view host) noexcept;
  int on_message_begin() noexcept;
  int on_method(const char* at, std::size_t length) noexcept;
  int on_url(const char* at, std::size_t length) noexcept;
  int on_url_complete() noexcept;
  int on_header_field(const char* at, std::size_t length) noexcept;
  int on_header_field_complete() noexcept;
  int on_header_value(const char* at, std::size_t length) noexcept;
  int on_header_value_complete() noexcept;
  int on_headers_complete() noexcept;
  int on_body(const char* at, std::size_t length) noexcept;
  int on_chunk_header() noexcept;
  int on_chunk_extension(const char* at, std::size_t length) noexcept;
  int on_message_complete() noexcept;
  int split_target();  // May throw std::bad_alloc (decoding the path).
  bool scan_for_bare_cr(const char* end) noexcept;
  int grow_body(std::size_t length) noexcept;

  llhttp_t parser_;                        // llhttp's state; parser_.data points back here.
  const Limits* limits_;                   // Server-owned limits, read at each check.
  MemoryBudget* body_budget_;              // Server-wide body bytes, or nullptr.
  std::size_t body_charged_ = 0;           // Bytes of body capacity charged to body_budget_.
  Request* request_ = nullptr;             // Where the current message goes.
  ParsePhase phase_ = ParsePhase::idle;    // Drives the connection's timeouts.
  const char* message_start_ = nullptr;    // First byte of the method.
  const char* views_end_ = nullptr;        // End of the furthest URL or header piece.
  const char* value_end_ = nullptr;        // End of the current header value's last piece.
  const char* scan_from_ = nullptr;        // First byte not yet checked for a bare CR.
  bool pending_cr_ = false;                // The last byte checked was a CR; an LF must follow.
  int chunk_crlf_expected_ = 0;            // Bytes of the CRLF that must end chunk data (2, 1, 0).
  std::size_t url_bytes_ = 0;              // Request-target bytes so far.
  std::size_t header_bytes_ = 0;           // Header (or trailer) name and value bytes so far.
  std::size_t header_count_ = 0;           // Header (or trailer) lines so far.
  std::size_t chunk_extension_bytes_ = 0;  // All chunk extension bytes of this body.
  std::size_t host_count_ = 0;             // Host header lines.
  std::size_t transfer_encoding_count_ = 0;  // Transfer-Encoding header lines.
  bool in_header_field_ = false;             // A header name is being received.
  bool in_trailers_ = false;                 // Header callbacks now carry trailers.
  bool expect_continue_ = false;             // "Expect: 100-continue" with a body to come.
  bool expect_unsupported_ = false;          // An Expect value other than 100-continue.
  bool upgrade_requested_ = false;           // Upgrade asked for; served as HTTP, then closed.
  bool keep_alive_ = false;                  // llhttp_should_keep_alive at completion.
  bool fast_head_ = true;                    // Try take_simple_head() before llhttp.
  bool after_last_message_ = false;          // A message without keep-alive was answered.
  bool llhttp_used_ = false;                 // llhttp_execute() ran since the last reset.
  std::array<char, 64> last_valid_host_{};   // A Host value that passed the checks,
  std::size_t last_valid_host_size_ = ~std::size_t{0};  // of this length (none: ~0).
  int error_status_ = 0;                                // Set by fail() or from llhttp's error.
  std::string_view error_reason_;                       // A static string naming the problem.
  // Streamed bodies (set by the connection; see pause_before_body).
  enum class BodySink : std::uint8_t { buffer, queue, discard };
  bool pause_before_body_ = false;         // Stop after a head with a body.
  BodySink body_sink_ = BodySink::buffer;  // Where on_body puts the bytes.
  std::string* body_queue_ = nullptr;      // For BodySink::queue.
  std::uint64_t body_received_ = 0;        // Body bytes of this message so far.
  std::int64_t declared_length_ = -1;      // Content-Length, or -1 (chunked or none yet).
};

}  // namespace squall::http

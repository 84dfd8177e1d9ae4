// A one-pass reader for the commonest request head, tried before llhttp when a read holds a
// whole head. It accepts only a strict subset of what llhttp accepts and leaves every other
// head (and every doubt) to llhttp, so what it accepts is parsed exactly as llhttp would parse
// it; tests/unit/http/fast_head_test.cpp and fuzz/fast_head_fuzz.cpp compare the two.
//
// The subset, byte by byte:
//   request-line = method SP target SP ( "HTTP/1.1" / "HTTP/1.0" ) CRLF
//   method       = "GET" / "HEAD" / "POST" / "PUT" / "DELETE" / "OPTIONS" / "PATCH"
//   target       = "/" *( %x21-7E except "#" and "%" )        ; origin-form, nothing to decode
//   header-line  = name ":" *SP value CRLF
//   name         = 1*tchar                                    ; RFC 9110 5.6.2
//   value        = %x21-7E [ *( %x20-7E ) %x21-7E ]           ; no tab, CTL or obs-text
//   head         = request-line *header-line CRLF
// and, by name: no Transfer-Encoding, Upgrade, Expect or Proxy-Connection; Content-Length at
// most once, as 1 to 18 decimal digits; Connection only as "keep-alive" (an HTTP/1.0 request
// without it, or one asking to close, goes to llhttp). The semantic checks (Host rules, limits)
// stay in the RequestParser, which applies them to the result exactly as it does to llhttp's,
// and takes a body only when all of it has arrived with the head.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "squall/http/request.hpp"

namespace squall::http::detail {

// scan_simple_head() sets every field when it returns true, so the scalar fields have no
// initialisers (the fast path declares one for each request).
struct SimpleHead {
  int method;                    // An llhttp_method_t.
  std::string_view method_name;  // Its name, as llhttp_method_name() spells it.
  std::string_view target;       // Into the input.
  const char* query_mark;        // The target's first '?', or nullptr.
  int http_minor;                // 0 or 1.
  std::size_t length;            // Bytes through the blank line that ends the head.
  std::uint64_t content_length;  // The declared body length; 0 without Content-Length.
  std::size_t header_bytes;      // Name and value bytes, as the parser counts them.
  std::size_t host_count;        // Host header lines.
  std::string_view host;         // The last Host value.
  const char* views_end;         // One past the last byte of the last view.
};

// Reads a complete head of the subset above from the start of `data` into `head` and `headers`
// (cleared first; its capacity is reused). Returns false, with `headers` in any state, when the
// input does not start with a whole head of the subset or memory runs out.
bool scan_simple_head(const char* data, std::size_t length, SimpleHead& head,
                      std::vector<Header>& headers) noexcept;

// Whether `host` is a reg-name of unreserved and sub-delim bytes other than ',' (no escapes),
// then optionally ':' and digits: a Host value the parser's full check (no ", \t", then
// host[:port] syntax) accepts, decided with one table lookup per byte. false means "ask the full
// check", not "invalid".
bool is_simple_host(std::string_view host) noexcept;

}  // namespace squall::http::detail

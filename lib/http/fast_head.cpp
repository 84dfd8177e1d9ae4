#include "http/fast_head.hpp"

#include <llhttp.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <new>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace squall::http::detail {

namespace {

enum : unsigned char {
  kTokenByte = 1,    // tchar of RFC 9110 5.6.2.
  kTargetByte = 2,   // %x21-7E except "#" and "%".
  kVisibleByte = 4,  // %x21-7E.
  kValueByte = 8,    // %x20-7E.
  kHostByte = 16,    // unreserved and sub-delims of RFC 3986 except ",".
};

constexpr std::array<unsigned char, 256> make_classes() noexcept {
  std::array<unsigned char, 256> classes{};
  for (int c = 0x20; c <= 0x7e; ++c) {
    unsigned char bits = kValueByte;
    if (c != ' ') bits |= kVisibleByte;
    if (c != ' ' && c != '#' && c != '%') bits |= kTargetByte;
    const bool alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    for (const char* s = "!#$%&'*+-.^_`|~"; *s != '\0'; ++s) {
      if (*s == c) bits |= kTokenByte;
    }
    if (alnum) bits |= kTokenByte | kHostByte;
    for (const char* s = "-._~!$&'()*+;="; *s != '\0'; ++s) {
      if (*s == c) bits |= kHostByte;
    }
    classes[static_cast<std::size_t>(c)] = bits;
  }
  return classes;
}

constexpr std::array<unsigned char, 256> kClasses = make_classes();

bool is(char c, unsigned char bits) noexcept {
  return (kClasses[static_cast<unsigned char>(c)] & bits) != 0;
}

// The first byte at or after p (before end) outside %x21-7E, or outside %x20-7E when
// `with_space`; also stops at "#" and "%" when `target`. Sixteen bytes at a time where SSE2 is
// there (signed compares: bytes from 0x80 are negative, below the range).
template <bool with_space, bool target>
const char* skip_visible(const char* p, const char* end) noexcept {
#if defined(__SSE2__)
  const __m128i low = _mm_set1_epi8(with_space ? 0x1f : 0x20);
  const __m128i high = _mm_set1_epi8(0x7f);
  const __m128i hash = _mm_set1_epi8('#');
  const __m128i percent = _mm_set1_epi8('%');
  while (end - p >= 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    __m128i inside = _mm_and_si128(_mm_cmpgt_epi8(bytes, low), _mm_cmplt_epi8(bytes, high));
    if (target) {
      inside = _mm_andnot_si128(
          _mm_or_si128(_mm_cmpeq_epi8(bytes, hash), _mm_cmpeq_epi8(bytes, percent)), inside);
    }
    const unsigned outside = ~static_cast<unsigned>(_mm_movemask_epi8(inside)) & 0xffffu;
    if (outside != 0) return p + __builtin_ctz(outside);
    p += 16;
  }
#endif
  const unsigned char bits = target ? kTargetByte : with_space ? kValueByte : kVisibleByte;
  while (p < end && is(*p, bits)) ++p;
  return p;
}

bool take_method(const char*& p, const char* end, SimpleHead& head) noexcept {
  if (p == end) return false;
  const auto match = [&](int method, std::string_view name) noexcept {
    if (static_cast<std::size_t>(end - p) <= name.size() ||
        std::memcmp(p, name.data(), name.size()) != 0 || p[name.size()] != ' ') {
      return false;
    }
    head.method = method;
    head.method_name = name;
    p += name.size() + 1;
    return true;
  };
  switch (*p) {
    case 'G':
      return match(HTTP_GET, "GET");
    case 'H':
      return match(HTTP_HEAD, "HEAD");
    case 'D':
      return match(HTTP_DELETE, "DELETE");
    case 'O':
      return match(HTTP_OPTIONS, "OPTIONS");
    case 'P':
      return match(HTTP_POST, "POST") || match(HTTP_PUT, "PUT") || match(HTTP_PATCH, "PATCH");
    default:
      return false;
  }
}

// Whether `text` (tokens or visible ASCII) equals `lower` (lowercase letters and '-') ignoring
// case: among those bytes only 'A'-'Z' and 'a'-'z' map to a letter under | 0x20, and only '-'
// to '-'.
bool equals_lower(std::string_view text, std::string_view lower) noexcept {
  if (text.size() != lower.size()) return false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if ((text[i] | 0x20) != lower[i]) return false;
  }
  return true;
}

// What a header's name means for the subset: most names mean nothing here.
enum class NameKind { plain, host, connection, content_length, refused };

NameKind kind_of(std::string_view name) noexcept {
  switch (name.size()) {
    case 4: {
      // The commonest name, tested as one word (the same fold as equals_lower's).
      std::uint32_t word;
      std::uint32_t host;
      std::memcpy(&word, name.data(), 4);
      std::memcpy(&host, "host", 4);
      return (word | 0x20202020u) == host ? NameKind::host : NameKind::plain;
    }
    case 6:
      return equals_lower(name, "expect") ? NameKind::refused : NameKind::plain;
    case 7:
      return equals_lower(name, "upgrade") ? NameKind::refused : NameKind::plain;
    case 10:
      return equals_lower(name, "connection") ? NameKind::connection : NameKind::plain;
    case 14:
      return equals_lower(name, "content-length") ? NameKind::content_length : NameKind::plain;
    case 16:
      return equals_lower(name, "proxy-connection") ? NameKind::refused : NameKind::plain;
    case 17:
      return equals_lower(name, "transfer-encoding") ? NameKind::refused : NameKind::plain;
    default:
      return NameKind::plain;
  }
}

// kBounded false: the input ends with CRLF CRLF. No byte class holds CR, so every scan stops at
// a CR before the end, a header line cannot end with the final CRLF (its value would end with
// LF), and the bounds checks inside the byte loops can go.
template <bool kBounded>
bool scan(const char* data, std::size_t length, SimpleHead& head,
          std::vector<Header>& headers) noexcept {
  const char* p = data;
  const char* const end = data + length;

  if (!take_method(p, end, head)) return false;
  const char* const target = p;
  if (p == end || *p != '/') return false;
  p = skip_visible<false, true>(p, end);
  head.target = std::string_view(target, static_cast<std::size_t>(p - target));
  if (end - p < 11 || std::memcmp(p, " HTTP/1.", 8) != 0 || (p[8] != '0' && p[8] != '1') ||
      p[9] != '\r' || p[10] != '\n') {
    return false;
  }
  head.http_minor = p[8] - '0';
  head.views_end = p;
  p += 11;

  headers.clear();
  head.header_bytes = 0;
  head.content_length = 0;
  head.host_count = 0;
  head.host = {};
  bool keep_alive_asked = false;
  bool content_length_seen = false;
  for (;;) {
    if (end - p < 2) return false;
    if (*p == '\r') {
      if (p[1] != '\n') return false;
      p += 2;
      break;
    }
    const char* const name = p;
    while ((!kBounded || p < end) && is(*p, kTokenByte)) ++p;
    if (p == name || (kBounded && p == end) || *p != ':') return false;
    const std::string_view name_view(name, static_cast<std::size_t>(p - name));
    ++p;
    while ((!kBounded || p < end) && *p == ' ') ++p;
    if ((kBounded && p == end) || !is(*p, kVisibleByte)) return false;
    const char* const value = p;
    p = skip_visible<true, false>(p, end);
    if (end - p < 2 || p[0] != '\r' || p[1] != '\n' || p[-1] == ' ') return false;
    const std::string_view value_view(value, static_cast<std::size_t>(p - value));
    head.views_end = p;
    p += 2;

    switch (kind_of(name_view)) {
      case NameKind::plain:
        break;
      case NameKind::host:
        ++head.host_count;
        head.host = value_view;
        break;
      case NameKind::connection:
        if (!equals_lower(value_view, "keep-alive")) return false;
        keep_alive_asked = true;
        break;
      case NameKind::content_length:
        // Digits only (llhttp's own syntax, leading zeros included); 18 of them cannot
        // overflow. A sign, a list or a second header goes to llhttp, which refuses it.
        if (content_length_seen || value_view.size() > 18) return false;
        head.content_length = 0;
        for (const char digit : value_view) {
          if (digit < '0' || digit > '9') return false;
          head.content_length = head.content_length * 10 + static_cast<unsigned>(digit - '0');
        }
        content_length_seen = true;
        break;
      case NameKind::refused:
        return false;
    }
    head.header_bytes += name_view.size() + value_view.size();
    try {
      headers.push_back(Header{name_view, value_view});
    } catch (const std::bad_alloc&) {
      return false;
    }
  }
  // An HTTP/1.0 request keeps the connection only when it asks to.
  if (head.http_minor == 0 && !keep_alive_asked) return false;
  head.length = static_cast<std::size_t>(p - data);
  return true;
}

}  // namespace

bool scan_simple_head(const char* data, std::size_t length, SimpleHead& head,
                      std::vector<Header>& headers) noexcept {
  if (length >= 4 && std::memcmp(data + length - 4, "\r\n\r\n", 4) == 0) {
    return scan<false>(data, length, head, headers);
  }
  return scan<true>(data, length, head, headers);
}

bool is_simple_host(std::string_view host) noexcept {
  std::size_t i = 0;
  while (i < host.size() && is(host[i], kHostByte)) ++i;
  if (i == host.size()) return true;
  if (host[i] != ':') return false;
  for (++i; i < host.size(); ++i) {
    if (host[i] < '0' || host[i] > '9') return false;
  }
  return true;
}

}  // namespace squall::http::detail

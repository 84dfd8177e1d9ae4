#include "http/fast_head.hpp"

#include <llhttp.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <new>

#if defined(__SSE2__)
#include <emmintrin.h>

#include "core/hot.hpp"
#include "http/short_equal.hpp"
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

static_assert(std::endian::native == std::endian::little ||
              std::endian::native == std::endian::big);

// Byte `i` of a Word as load_word() reads it from memory. consteval: the words below are constants.
template <typename Word>
consteval Word byte_at(unsigned char byte, std::size_t i) noexcept {
  const std::size_t shift =
      std::endian::native == std::endian::little ? 8 * i : 8 * (sizeof(Word) - 1 - i);
  return static_cast<Word>(static_cast<Word>(byte) << shift);
}

// `text` (at most sizeof(Word) bytes) as load_word() reads it from memory, zeros after it.
template <typename Word>
consteval Word word_of(std::string_view text) noexcept {
  Word word = 0;
  for (std::size_t i = 0; i < text.size(); ++i) {
    word |= byte_at<Word>(static_cast<unsigned char>(text[i]), i);
  }
  return word;
}

// Keeps the first `n` bytes of a loaded Word.
template <typename Word>
consteval Word prefix_mask(std::size_t n) noexcept {
  return word_of<Word>(std::string_view("\xff\xff\xff\xff\xff\xff\xff\xff", n));
}

#if defined(__SSE2__)
// 0xFF in each byte of `bytes` within [first, first + count), 0 in the others: adding 0x80 -
// first (mod 256) moves that range to the lowest signed bytes, [-128, -128 + count), and every
// other byte above them, so one signed compare tells.
__m128i bytes_in(__m128i bytes, int first, int count) noexcept {
  return _mm_cmplt_epi8(_mm_add_epi8(bytes, _mm_set1_epi8(static_cast<char>(0x80 - first))),
                        _mm_set1_epi8(static_cast<char>(-128 + count)));
}

// The bits of the bytes of the 16-byte mask `inside` that are 0.
unsigned outside_bits(__m128i inside) noexcept {
  return ~static_cast<unsigned>(_mm_movemask_epi8(inside)) & 0xffffu;
}
#endif

// The end of the target that starts at p: the first byte (before end) outside %x21-7E or at "#"
// or "%". `query_mark` is set to the target's first "?", or to nullptr. Sixteen bytes at a time
// where SSE2 is there.
const char* skip_target(const char* p, const char* end, const char*& query_mark) noexcept {
  query_mark = nullptr;
#if defined(__SSE2__)
  const __m128i hash = _mm_set1_epi8('#');
  const __m128i percent = _mm_set1_epi8('%');
  const __m128i question = _mm_set1_epi8('?');
  while (end - p >= 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const unsigned outside = outside_bits(
        _mm_andnot_si128(_mm_or_si128(_mm_cmpeq_epi8(bytes, hash), _mm_cmpeq_epi8(bytes, percent)),
                         bytes_in(bytes, 0x21, 0x5e)));
    // The "?" bytes before the first byte outside (all of them when there is none).
    const unsigned marks =
        static_cast<unsigned>(_mm_movemask_epi8(_mm_cmpeq_epi8(bytes, question))) &
        ((outside & (0u - outside)) - 1u);
    if (marks != 0 && query_mark == nullptr) query_mark = p + __builtin_ctz(marks);
    if (outside != 0) return p + __builtin_ctz(outside);
    p += 16;
  }
#endif
  for (; p < end && is(*p, kTargetByte); ++p) {
    if (*p == '?' && query_mark == nullptr) query_mark = p;
  }
  return p;
}

// The first byte at or after p (before end, or before the CR that ends the input when not
// kBounded) that is not a tchar. Sixteen bytes at a time where SSE2 is there: the tchars are the
// bytes of %x21-7E other than the delimiters DQUOTE and "(),/:;<=>?@[\]{}", which are 0x22,
// 0x28-29, 0x2C, 0x2F, 0x3A-40, 0x5B-5D, 0x7B and 0x7D.
template <bool kBounded>
const char* skip_token(const char* p, const char* end) noexcept {
#if defined(__SSE2__)
  while (end - p >= 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const auto is_byte = [&](char byte) noexcept {
      return _mm_cmpeq_epi8(bytes, _mm_set1_epi8(byte));
    };
    const __m128i delimiters =
        _mm_or_si128(_mm_or_si128(_mm_or_si128(bytes_in(bytes, 0x28, 2), bytes_in(bytes, 0x3a, 7)),
                                  _mm_or_si128(bytes_in(bytes, 0x5b, 3), is_byte('"'))),
                     _mm_or_si128(_mm_or_si128(is_byte(','), is_byte('/')),
                                  _mm_or_si128(is_byte('{'), is_byte('}'))));
    const unsigned outside =
        outside_bits(_mm_andnot_si128(delimiters, bytes_in(bytes, 0x21, 0x5e)));
    if (outside != 0) return p + __builtin_ctz(outside);
    p += 16;
  }
#endif
  while ((!kBounded || p < end) && is(*p, kTokenByte)) ++p;
  return p;
}

// The first byte at or after p (before end) outside %x20-7E, sixteen bytes at a time where SSE2
// is there.
const char* skip_value(const char* p, const char* end) noexcept {
#if defined(__SSE2__)
  while (end - p >= 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const unsigned outside = outside_bits(bytes_in(bytes, 0x20, 0x5f));
    if (outside != 0) return p + __builtin_ctz(outside);
    p += 16;
  }
#endif
  while (p < end && is(*p, kValueByte)) ++p;
  return p;
}

struct Method {
  int method;             // An llhttp_method_t.
  std::string_view name;  // As llhttp_method_name() spells it.
  std::uint64_t word;     // The name and SP, as load_word<std::uint64_t>() reads them;
  std::uint64_t mask;     // the bytes of the word they take.
};

consteval Method method_of(int method, std::string_view name) noexcept {
  return {method, name, word_of<std::uint64_t>(name) | byte_at<std::uint64_t>(' ', name.size()),
          prefix_mask<std::uint64_t>(name.size() + 1)};
}

constexpr Method kGet = method_of(HTTP_GET, "GET");
constexpr Method kHead = method_of(HTTP_HEAD, "HEAD");
constexpr Method kPost = method_of(HTTP_POST, "POST");
constexpr Method kPut = method_of(HTTP_PUT, "PUT");
constexpr Method kDelete = method_of(HTTP_DELETE, "DELETE");
constexpr Method kOptions = method_of(HTTP_OPTIONS, "OPTIONS");
constexpr Method kPatch = method_of(HTTP_PATCH, "PATCH");

// The method and its SP, each tried as one masked compare of the first eight bytes ("OPTIONS "
// fills them; every head of the subset is longer).
bool take_method(const char*& p, const char* end, SimpleHead& head) noexcept {
  if (end - p < 8) return false;
  const auto word = load_word<std::uint64_t>(p);
  const auto take = [&](const Method& method) noexcept {
    if ((word & method.mask) != method.word) return false;
    head.method = method.method;
    head.method_name = method.name;
    p += method.name.size() + 1;
    return true;
  };
  if (take(kGet)) return true;  // The commonest method, before the dispatch on its first byte.
  switch (*p) {
    case 'H':
      return take(kHead);
    case 'D':
      return take(kDelete);
    case 'O':
      return take(kOptions);
    case 'P':
      return take(kPost) || take(kPut) || take(kPatch);
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

// Room for more headers: twice the capacity, at least 8. false when memory runs out.
[[gnu::noinline]] bool grow(std::vector<Header>& headers) noexcept {
  try {
    headers.reserve(std::max<std::size_t>(8, 2 * headers.capacity()));
  } catch (const std::bad_alloc&) {
    return false;
  }
  return true;
}

// "Host:" in any case: the first four bytes folded as equals_lower() folds them, the colon as
// it is.
constexpr std::uint64_t kHostFold = word_of<std::uint64_t>("\x20\x20\x20\x20");
constexpr std::uint64_t kHostMask = prefix_mask<std::uint64_t>(5);
constexpr std::uint64_t kHostColon = word_of<std::uint64_t>("host:");

// kBounded false: the input ends with CRLF CRLF. No byte class holds CR, so every scan stops at
// a CR before the end, a header line cannot end with the final CRLF (its value would end with
// LF), and the bounds checks inside the byte loops can go. flatten: the helpers above (but grow())
// and vector::push_back are inlined into both instances (GCC would otherwise call them).
template <bool kBounded>
SQUALL_HOT [[gnu::flatten]] bool scan(const char* data, std::size_t length, SimpleHead& head,
                                      std::vector<Header>& headers) noexcept {
  const char* p = data;
  const char* const end = data + length;

  if (!take_method(p, end, head)) return false;
  const char* const target = p;
  if (p == end || *p != '/') return false;
  p = skip_target(p, end, head.query_mark);
  head.target = std::string_view(target, static_cast<std::size_t>(p - target));
  // " HTTP/1." as one word, then ".0\r\n" or ".1\r\n" as another: '0' and '1' differ in their
  // lowest bit only.
  if (end - p < 11 || load_word<std::uint64_t>(p) != word_of<std::uint64_t>(" HTTP/1.") ||
      (load_word<std::uint32_t>(p + 7) | byte_at<std::uint32_t>(1, 1)) !=
          word_of<std::uint32_t>(".1\r\n")) {
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
    NameKind kind;
    // The commonest name first, as one word; any other goes through the token scan.
    if (end - p >= 8 && ((load_word<std::uint64_t>(p) | kHostFold) & kHostMask) == kHostColon) {
      kind = NameKind::host;
      p += 4;
    } else {
      p = skip_token<kBounded>(p, end);
      if (p == name || (kBounded && p == end) || *p != ':') return false;
      kind = kind_of(std::string_view(name, static_cast<std::size_t>(p - name)));
    }
    const std::string_view name_view(name, static_cast<std::size_t>(p - name));
    ++p;
    while ((!kBounded || p < end) && *p == ' ') ++p;
    if ((kBounded && p == end) || !is(*p, kVisibleByte)) return false;
    const char* const value = p;
    p = skip_value(p, end);
    if (end - p < 2 || load_word<std::uint16_t>(p) != word_of<std::uint16_t>("\r\n") ||
        p[-1] == ' ') {
      return false;
    }
    const std::string_view value_view(value, static_cast<std::size_t>(p - value));
    head.views_end = p;
    p += 2;

    switch (kind) {
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
    // Growth out of line (the capacity is reused, so it is rare); then push_back cannot
    // reallocate, and its reallocating branch goes from the loop.
    if (headers.size() == headers.capacity() && !grow(headers)) return false;
    if (headers.size() == headers.capacity()) __builtin_unreachable();
    headers.push_back(Header{name_view, value_view});
  }
  // An HTTP/1.0 request keeps the connection only when it asks to.
  if (head.http_minor == 0 && !keep_alive_asked) return false;
  head.length = static_cast<std::size_t>(p - data);
  return true;
}

}  // namespace

SQUALL_HOT bool scan_simple_head(const char* data, std::size_t length, SimpleHead& head,
                                 std::vector<Header>& headers) noexcept {
  if (length >= 4 &&
      load_word<std::uint32_t>(data + length - 4) == word_of<std::uint32_t>("\r\n\r\n")) {
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

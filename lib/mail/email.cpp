#include "squall/mail/email.hpp"

#include "mail/email_dom.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <utility>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <nlohmann/json.hpp>

namespace squall::mail {
namespace {

using Json = nlohmann::json;

constexpr std::size_t kMaxAddrSpec = 254;  // RFC 5321 4.5.3.1.3 path (256) minus the brackets
constexpr std::size_t kMaxLocalPart = 64;  // RFC 5321 4.5.3.1.1
constexpr std::size_t kMaxDomain = 253;
constexpr std::size_t kMaxLabel = 63;
// Header lines stay within 78 characters where a fold is possible (RFC 5322 2.1.1).
constexpr std::size_t kHeaderLine = 78;
// An encoded-word is at most 75 characters (RFC 2047 2); 42 bytes of UTF-8 make 56 base64
// characters and a 68-character word, so "Subject: " plus one word still fits in 78.
constexpr std::size_t kEncodedWordBytes = 42;
// Quoted-printable lines are at most 76 characters (RFC 2045 6.7 rule 5).
constexpr std::size_t kQpLine = 76;

constexpr std::array<std::string_view, 8> kRequestFields = {"to",       "cc",      "bcc",  "from",
                                                            "reply_to", "subject", "text", "html"};

// ---------------------------------------------------------------------------------------------
// Characters

constexpr bool is_ascii_alnum(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

// RFC 5322 3.2.3 atext: letters, digits and !#$%&'*+-/=?^_`{|}~. A table: every character of
// every local part and display name is looked up.
constexpr std::array<bool, 256> kAtext = [] {
  std::array<bool, 256> table{};
  for (int c = 0; c < 256; ++c) table[c] = is_ascii_alnum(static_cast<unsigned char>(c));
  for (const char c : std::string_view("!#$%&'*+-/=?^_`{|}~")) {
    table[static_cast<unsigned char>(c)] = true;
  }
  return table;
}();

bool is_atext(unsigned char c) {
  return kAtext[c];
}

bool has_cr_lf_nul(std::string_view s) {
  // A plain loop: find_first_of calls memchr on the three characters for every byte.
  for (const char c : s) {
    if (c == '\r' || c == '\n' || c == '\0') return true;
  }
  return false;
}

bool is_control(unsigned char c) {
  return c < 0x20 || c == 0x7f;
}

// Strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF.
bool valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    std::uint32_t cp = 0;
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
      cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > s.size()) return false;
    for (std::size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
        (cp >= 0xd800 && cp <= 0xdfff)) {
      return false;
    }
    i += len;
  }
  return true;
}

// The length of the UTF-8 sequence that starts with lead (input already validated).
std::size_t utf8_length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if (lead < 0xe0) return 2;
  if (lead < 0xf0) return 3;
  return 4;
}

std::string lower_ascii(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

std::string quote_for_message(std::string_view s) {
  return "'" + std::string(s) + "'";
}

// ---------------------------------------------------------------------------------------------
// Addresses

std::optional<std::string> check_domain(std::string_view domain) {
  if (domain.empty()) return "has no domain after the @";
  if (domain.front() == '[') {
    if (domain.back() != ']') return "the domain literal is not closed with ]";
    std::string inner(domain.substr(1, domain.size() - 2));
    unsigned char buf[16];
    if (inner.size() > 5 && lower_ascii(inner.substr(0, 5)) == "ipv6:") {
      if (inet_pton(AF_INET6, inner.c_str() + 5, buf) == 1) return std::nullopt;
    } else if (inet_pton(AF_INET, inner.c_str(), buf) == 1) {
      return std::nullopt;
    }
    return "the domain literal " + std::string(domain) +
           " is neither an IPv4 address nor IPv6:<IPv6 address>";
  }
  if (domain.size() > kMaxDomain) return "the domain is longer than 253 octets";
  std::string_view last_label;
  std::size_t start = 0;
  while (true) {
    const std::size_t dot = domain.find('.', start);
    const std::string_view label =
        domain.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start);
    if (label.empty()) return "the domain has an empty label (a leading, trailing or double dot)";
    for (const char ch : label) {
      const auto c = static_cast<unsigned char>(ch);
      if (c >= 0x80) {
        return "the domain has a non-ASCII character (give an internationalized domain in its "
               "xn-- form)";
      }
      if (!is_ascii_alnum(c) && c != '-') {
        return "the domain label " + quote_for_message(label) +
               " has a character other than a letter, digit or hyphen";
      }
    }
    if (label.size() > kMaxLabel) {
      return "the domain label " + quote_for_message(label) + " is longer than 63 octets";
    }
    if (label.front() == '-' || label.back() == '-') {
      return "the domain label " + quote_for_message(label) + " starts or ends with a hyphen";
    }
    last_label = label;
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  bool numeric = true;
  for (const char c : last_label) numeric = numeric && c >= '0' && c <= '9';
  if (numeric) {
    return "the domain ends in a numeric label (write an IP address as a literal, e.g. "
           "[192.0.2.1])";
  }
  return std::nullopt;
}

// addr-spec = local-part "@" domain, with the local part a dot-atom or a quoted string. Returns
// what is wrong, or nullopt.
std::optional<std::string> check_addr_spec(std::string_view s) {
  if (s.empty()) return std::string("is empty");
  if (s.size() > kMaxAddrSpec) return std::string("is longer than 254 octets");
  std::size_t at = 0;
  if (s.front() == '"') {
    std::size_t i = 1;
    for (; i < s.size(); ++i) {
      const auto c = static_cast<unsigned char>(s[i]);
      if (c == '"') break;
      if (c < 0x20 || c > 0x7e) {
        return std::string("the quoted local part has a character that is not printable ASCII");
      }
      if (c == '\\') {
        if (i + 1 >= s.size()) {
          i = s.size();  // a trailing backslash escapes nothing: not closed
          break;
        }
        const auto next = static_cast<unsigned char>(s[i + 1]);
        if (next < 0x20 || next > 0x7e) {
          return std::string("the quoted local part has a character that is not printable ASCII");
        }
        ++i;
      }
    }
    if (i >= s.size()) return std::string("the quoted local part is not closed");
    at = i + 1;
    if (at >= s.size() || s[at] != '@') {
      return std::string("has no @ right after the quoted local part");
    }
  } else {
    at = s.find('@');
    if (at == std::string_view::npos) return std::string("has no @");
  }
  const std::string_view local = s.substr(0, at);
  const std::string_view domain = s.substr(at + 1);
  if (local.empty()) return std::string("has an empty local part");
  if (local.size() > kMaxLocalPart) return std::string("has a local part longer than 64 octets");
  if (local.front() != '"') {
    for (std::size_t i = 0; i < local.size(); ++i) {
      const auto c = static_cast<unsigned char>(local[i]);
      if (c == '.') {
        if (i == 0 || i + 1 == local.size() || local[i - 1] == '.') {
          return std::string(
              "the local part has a leading, trailing or double dot (quote it to allow that)");
        }
      } else if (c >= 0x80) {
        return std::string("the local part has a non-ASCII character (not supported)");
      } else if (!is_atext(c)) {
        return "the local part has the character " + quote_for_message(std::string(1, char(c))) +
               ", which is only allowed in a quoted local part";
      }
    }
  }
  return check_domain(domain);
}

// ---------------------------------------------------------------------------------------------
// JSON request parsing

struct DuplicateKey {
  std::string key;
};

// Replays a document that failed to parse and records where the parser stood, so that a string
// that is not valid UTF-8 is reported against its field ("to[1]") instead of the whole body.
class PathTracker : public nlohmann::json_sax<Json> {
 public:
  std::string field() const {
    std::string path;
    for (std::size_t depth = 0; depth < frames_.size(); ++depth) {
      const Frame& frame = frames_[depth];
      if (frame.array) {
        path += "[" + std::to_string(frame.index) + "]";
      } else {
        if (frame.expect_key) return "";  // the error is in a key, not a value
        if (depth > 0) path += ".";
        path += frame.key;
      }
    }
    return path;
  }

  bool null() override { return value(); }
  bool boolean(bool) override { return value(); }
  bool number_integer(number_integer_t) override { return value(); }
  bool number_unsigned(number_unsigned_t) override { return value(); }
  bool number_float(number_float_t, const string_t&) override { return value(); }
  bool string(string_t&) override { return value(); }
  bool binary(binary_t&) override { return value(); }
  bool start_object(std::size_t) override {
    frames_.push_back(Frame{false, true, {}, 0});
    return true;
  }
  bool key(string_t& key) override {
    frames_.back().key = key;
    frames_.back().expect_key = false;
    return true;
  }
  bool end_object() override {
    frames_.pop_back();
    return value();
  }
  bool start_array(std::size_t) override {
    frames_.push_back(Frame{true, false, {}, 0});
    return true;
  }
  bool end_array() override {
    frames_.pop_back();
    return value();
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override {
    return false;
  }

 private:
  struct Frame {
    bool array;
    bool expect_key;
    std::string key;
    std::size_t index;
  };

  bool value() {
    if (!frames_.empty()) {
      Frame& frame = frames_.back();
      if (frame.array) {
        ++frame.index;
      } else {
        frame.expect_key = true;
      }
    }
    return true;
  }

  std::vector<Frame> frames_;
};

FieldError json_error(std::string_view body, const Json::parse_error& error) {
  std::string what = error.what();
  // "[json.exception.parse_error.101] parse error at line 1, column 7: ..." -> "parse error ..."
  if (const auto bracket = what.find("] "); what.starts_with("[json.") && bracket != what.npos) {
    what.erase(0, bracket + 2);
  }
  if (what.find("UTF-8") != what.npos || what.find("surrogate") != what.npos) {
    PathTracker tracker;
    Json::sax_parse(body.begin(), body.end(), &tracker);
    const std::string field = tracker.field();
    if (!field.empty()) {
      return {field, "is not valid UTF-8 (byte " + std::to_string(error.byte) + " of the body)"};
    }
  }
  return {"body", "is not valid JSON: " + what};
}

// An address bound for a header: CR, LF and NUL would let the client add headers of its own.
std::optional<std::string> check_address_text(std::string_view text, std::string_view& addr_spec,
                                              std::string* display_name);

// Whether an address bound for a header is acceptable: what check_address refuses, without the
// error text.
bool address_ok(std::string_view value) {
  std::string_view addr_spec;
  return !has_cr_lf_nul(value) && !check_address_text(value, addr_spec, nullptr);
}

std::optional<FieldError> check_address(const std::string& field, std::string_view value) {
  if (has_cr_lf_nul(value)) {
    return FieldError{field, "contains CR, LF or NUL (header injection is not allowed)"};
  }
  std::string_view addr_spec;
  if (auto reason = check_address_text(value, addr_spec, nullptr)) {
    return FieldError{field, "is not a valid address: " + *reason};
  }
  return std::nullopt;
}

// The subject goes into a header: no line breaks, no control characters but tab.
std::optional<FieldError> check_subject(std::string_view subject) {
  if (has_cr_lf_nul(subject)) {
    return FieldError{"subject", "contains CR, LF or NUL (header injection is not allowed)"};
  }
  if (!valid_utf8(subject)) return FieldError{"subject", "is not valid UTF-8"};
  for (const char c : subject) {
    if (c != '\t' && is_control(static_cast<unsigned char>(c))) {
      return FieldError{"subject", "contains a control character"};
    }
  }
  return std::nullopt;
}

// A string field: absent or null leaves out untouched.
std::optional<FieldError> get_string(const Json& doc, const char* name, bool required,
                                     std::string& out) {
  const auto it = doc.find(name);
  if (it == doc.end() || it->is_null()) {
    if (required) return FieldError{name, "is required"};
    return std::nullopt;
  }
  if (!it->is_string()) return FieldError{name, "must be a string"};
  out = it->get<std::string>();
  return std::nullopt;
}

// An address list ("a@b.c" or ["a@b.c", ...]) with every element checked and counted against
// the recipient limit, which spans to, cc and bcc.
std::optional<FieldError> get_recipients(const Json& doc, const char* name, bool required,
                                         const EmailLimits& limits, std::size_t& total,
                                         std::vector<std::string>& out) {
  const auto it = doc.find(name);
  if (it == doc.end() || it->is_null()) {
    if (required) return FieldError{name, "is required"};
    return std::nullopt;
  }
  std::vector<std::pair<std::string, std::string>> items;  // field name, value
  if (it->is_string()) {
    items.emplace_back(name, it->get<std::string>());
  } else if (it->is_array()) {
    if (required && it->empty()) return FieldError{name, "must not be an empty array"};
    for (std::size_t i = 0; i < it->size(); ++i) {
      const std::string field = std::string(name) + "[" + std::to_string(i) + "]";
      const Json& element = (*it)[i];
      if (!element.is_string()) return FieldError{field, "must be a string"};
      items.emplace_back(field, element.get<std::string>());
    }
  } else {
    return FieldError{name, "must be a string or an array of strings"};
  }
  for (auto& [field, value] : items) {
    if (++total > limits.max_recipients) {
      return FieldError{field, "is recipient number " + std::to_string(total) + "; at most " +
                                   std::to_string(limits.max_recipients) +
                                   " recipients (to + cc + bcc) are allowed"};
    }
    if (auto error = check_address(field, value)) return error;
    out.push_back(std::move(value));
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// Encodings

// The length of `bytes` bytes in base64, padded (RFC 4648 4).
constexpr std::size_t base64_size(std::size_t bytes) {
  return (bytes + 2) / 3 * 4;
}

void append_base64(std::string& out, std::string_view in) {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    const std::uint32_t n = (std::uint32_t(static_cast<unsigned char>(in[i])) << 16) |
                            (std::uint32_t(static_cast<unsigned char>(in[i + 1])) << 8) |
                            static_cast<unsigned char>(in[i + 2]);
    const char quad[4] = {kAlphabet[(n >> 18) & 63], kAlphabet[(n >> 12) & 63],
                          kAlphabet[(n >> 6) & 63], kAlphabet[n & 63]};
    out.append(quad, 4);
  }
  if (i + 1 == in.size()) {
    const std::uint32_t n = std::uint32_t(static_cast<unsigned char>(in[i])) << 16;
    out += kAlphabet[(n >> 18) & 63];
    out += kAlphabet[(n >> 12) & 63];
    out += "==";
  } else if (i + 2 == in.size()) {
    const std::uint32_t n = (std::uint32_t(static_cast<unsigned char>(in[i])) << 16) |
                            (std::uint32_t(static_cast<unsigned char>(in[i + 1])) << 8);
    out += kAlphabet[(n >> 18) & 63];
    out += kAlphabet[(n >> 12) & 63];
    out += kAlphabet[(n >> 6) & 63];
    out += '=';
  }
}

constexpr char kUpperHex[] = "0123456789ABCDEF";

void append_hex_escape(std::string& out, char prefix, unsigned char c) {
  const char escape[3] = {prefix, kUpperHex[c >> 4], kUpperHex[c & 15]};
  out.append(escape, 3);
}

// Printable ASCII other than "=": what quoted-printable writes as it is anywhere (rule 2).
bool qp_literal(unsigned char c) {
  return c >= 33 && c <= 126 && c != '=';
}

// One line of text (no line break in it) as quoted-printable lines of at most 76 characters.
// With `soft_break_after`, the caller ends the line with "=" CRLF, so its last encoded line
// keeps room for that "=". A "." at the start of a line stays literal: libcurl dot-stuffs the
// DATA it uploads.
void append_qp_line(std::string& out, std::string_view line, bool soft_break_after) {
  // Each encoded line is put together here and appended whole.
  char encoded[kQpLine];
  std::size_t column = 0;
  // Puts c as it is or as =XX, after a soft break when it would end past `limit`.
  const auto put = [&](unsigned char c, bool literal, std::size_t limit) {
    const std::size_t width = literal ? 1 : 3;
    if (column + width > limit) {
      out.append(encoded, column);
      out += "=\r\n";
      column = 0;
    }
    if (literal) {
      encoded[column] = static_cast<char>(c);
    } else {
      encoded[column] = '=';
      encoded[column + 1] = kUpperHex[c >> 4];
      encoded[column + 2] = kUpperHex[c & 15];
    }
    column += width;
  };
  // mbox writers would turn a line's "From " into ">From ": its "F" is encoded.
  const std::size_t first_literal = line.starts_with("From ") ? 1 : 0;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const auto c = static_cast<unsigned char>(line[i]);
    if (i + 1 < line.size()) {
      // Inside the line spaces and tabs are literal too; the soft break's "=" needs room.
      put(c, i >= first_literal && (qp_literal(c) || c == ' ' || c == '\t'), kQpLine - 1);
    } else {
      // The last character: whitespace before a line end must be encoded (rule 3), and the
      // soft break's "=" needs room only when one follows.
      put(c, i >= first_literal && qp_literal(c), soft_break_after ? kQpLine - 1 : kQpLine);
    }
  }
  out.append(encoded, column);
}

// Text as a quoted-printable body. CRLF, LF and a lone CR all end a line (hard CRLF breaks). The
// body always ends with CRLF; when the text itself does not end with a line break, that CRLF is
// a soft break ("=" CRLF), so decoding gives back the text exactly.
void append_quoted_printable(std::string& out, std::string_view text) {
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t end = start;
    // Most bytes are above '\r': one comparison tells them apart.
    while (end < text.size() && (text[end] > '\r' || (text[end] != '\r' && text[end] != '\n'))) {
      ++end;
    }
    if (end == text.size()) {
      append_qp_line(out, text.substr(start), /*soft_break_after=*/true);
      out += "=\r\n";
      break;
    }
    append_qp_line(out, text.substr(start, end - start), /*soft_break_after=*/false);
    out += "\r\n";
    start = end + ((text[end] == '\r' && end + 1 < text.size() && text[end + 1] == '\n') ? 2 : 1);
  }
}

// Writes one header, folding before a token when the line would pass 78 characters. Unfolding
// removes the CRLF and keeps the space, so a fold never changes the value. Tokens go straight
// into the message.
class HeaderWriter {
 public:
  HeaderWriter(std::string& out, std::string_view name) : out_(out), column_(name.size() + 1) {
    out_ += name;
    out_ += ':';
  }
  // Starts a token of `size` characters, after a space or a fold: the caller appends exactly
  // those characters to the string returned.
  std::string& begin_token(std::size_t size) {
    if (!first_ && column_ + 1 + size > kHeaderLine) {
      out_ += "\r\n";
      column_ = 0;
    }
    out_ += ' ';
    column_ += 1 + size;
    first_ = false;
    return out_;
  }
  void add(std::string_view token) { begin_token(token.size()) += token; }
  void end() { out_ += "\r\n"; }

 private:
  std::string& out_;
  std::size_t column_;
  bool first_ = true;
};

// UTF-8 text as RFC 2047 B encoded-words, split only between characters (RFC 2047 5).
void add_encoded_words(HeaderWriter& header, std::string_view text) {
  static constexpr std::string_view kOpen = "=?UTF-8?B?", kClose = "?=";
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t end = start;
    while (end < text.size()) {
      const std::size_t next = end + utf8_length(static_cast<unsigned char>(text[end]));
      if (next - start > kEncodedWordBytes) break;
      end = next;
    }
    const std::string_view piece = text.substr(start, end - start);
    std::string& out = header.begin_token(kOpen.size() + base64_size(piece.size()) + kClose.size());
    out += kOpen;
    append_base64(out, piece);
    out += kClose;
    start = end;
  }
}

bool printable_ascii(std::string_view s) {
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

// The next token of a plain unstructured value from `start`: a word with the extra spaces before
// it ("a  b" -> "a", " b"). The writer puts one space before each token and may fold there, so
// no token is empty and no folded line is whitespace only. `start` moves to the token after, or
// to npos after the last.
std::string_view next_word_token(std::string_view value, std::size_t& start) {
  std::size_t word = start;
  while (word < value.size() && value[word] == ' ') ++word;
  std::size_t space = word;
  while (space < value.size() && value[space] != ' ') ++space;
  const std::string_view token = value.substr(start, space - start);
  start = space < value.size() ? space + 1 : std::string_view::npos;
  return token;
}

// An unstructured value (Subject): as is, folded at its spaces, when it is printable ASCII that
// no decoder could mistake for encoded-words and every token fits on a line (the first after
// the header's name, in first_room); otherwise as encoded-words, which can always be folded and
// keep every space.
void add_unstructured(HeaderWriter& header, std::string_view value, std::size_t first_room) {
  bool plain = printable_ascii(value) && value.find("=?") == std::string_view::npos &&
               !value.starts_with(' ') && !value.ends_with(' ');
  for (std::size_t start = 0, room = first_room; plain && start != std::string_view::npos;
       room = kHeaderLine - 1) {
    plain = next_word_token(value, start).size() <= room;
  }
  if (!plain) {
    add_encoded_words(header, value);
    return;
  }
  for (std::size_t start = 0; start != std::string_view::npos;) {
    header.add(next_word_token(value, start));
  }
}

// A display name as a phrase: atoms when it is plain words, a quoted string when it is short
// printable ASCII with specials (e.g. "Doe, John"), encoded-words otherwise (non-ASCII, long).
void add_phrase(HeaderWriter& header, std::string_view name) {
  constexpr std::size_t kRoom = 70;
  if (printable_ascii(name) && name.find("=?") == std::string_view::npos) {
    // Atoms: the words between single spaces, each of atext and at most kRoom long.
    bool atoms_only = true, any_atom = false;
    std::size_t atom_length = 0;
    for (const char c : name) {
      if (c == ' ') {
        atom_length = 0;
        continue;
      }
      any_atom = true;
      if (!is_atext(static_cast<unsigned char>(c)) || ++atom_length > kRoom) atoms_only = false;
    }
    if (atoms_only && any_atom) {
      std::size_t start = 0;
      while (start <= name.size()) {
        std::size_t space = name.find(' ', start);
        if (space == std::string_view::npos) space = name.size();
        if (space > start) header.add(name.substr(start, space - start));
        start = space + 1;
      }
      return;
    }
    std::size_t quoted_size = name.size() + 2;
    for (const char c : name) quoted_size += c == '"' || c == '\\' ? 1 : 0;
    if (quoted_size <= kRoom) {
      std::string& out = header.begin_token(quoted_size);
      out += '"';
      for (const char c : name) {
        if (c == '"' || c == '\\') out += '\\';
        out += c;
      }
      out += '"';
      return;
    }
  }
  add_encoded_words(header, name);
}

// An address parsed for a header and the envelope. addr_spec is a view into the text parsed.
struct Mailbox {
  std::string_view addr_spec;
  std::string display_name;  // Unquoted, possibly UTF-8; empty when there is none.
};

// Parses text into mailbox, reusing its display name's buffer. Returns what is wrong, or
// nullopt.
std::optional<std::string> parse_mailbox(std::string_view text, Mailbox& mailbox) {
  mailbox.display_name.clear();
  return check_address_text(text, mailbox.addr_spec, &mailbox.display_name);
}

[[noreturn]] void throw_invalid_address(std::string_view what, std::string_view reason) {
  throw std::invalid_argument(std::string(what) +
                              " is not a valid address: " + std::string(reason));
}

// A mailbox's tokens: the display name's, then <addr-spec> (or the addr-spec alone), followed by
// a comma when another mailbox follows in the list.
void add_mailbox(HeaderWriter& header, const Mailbox& mailbox, bool comma) {
  const bool named = !mailbox.display_name.empty();
  if (named) add_phrase(header, mailbox.display_name);
  std::string& out =
      header.begin_token(mailbox.addr_spec.size() + (named ? 2 : 0) + (comma ? 1 : 0));
  if (named) out += '<';
  out += mailbox.addr_spec;
  if (named) out += '>';
  if (comma) out += ',';
}

// A To or Cc header. With `recipients`, each address's addr-spec is added to it, for the
// envelope.
void write_address_list(std::string& out, std::string_view name,
                        const std::vector<std::string>& addresses, Mailbox& mailbox,
                        std::vector<std::string_view>* recipients) {
  HeaderWriter header(out, name);
  for (std::size_t i = 0; i < addresses.size(); ++i) {
    if (auto reason = parse_mailbox(addresses[i], mailbox)) {
      throw_invalid_address(std::string(name) + "[" + std::to_string(i) + "]", *reason);
    }
    add_mailbox(header, mailbox, i + 1 < addresses.size());
    if (recipients != nullptr) recipients->push_back(mailbox.addr_spec);
  }
  header.end();
}

// Whether two addr-specs name one mailbox: domains are case-insensitive; local parts formally
// are not (RFC 5321 2.4). An order in which they sort together: the local part as given, then
// the domain in lower case.
bool mailbox_less(std::string_view a, std::string_view b) {
  const std::size_t a_domain = a.rfind('@') + 1, b_domain = b.rfind('@') + 1;
  const auto key = [](std::string_view s, std::size_t domain, std::size_t i) {
    const auto c = static_cast<unsigned char>(s[i]);
    return i >= domain && c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c;
  };
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const int x = key(a, a_domain, i), y = key(b, b_domain, i);
    if (x != y) return x < y;
  }
  return a.size() < b.size();
}

// The envelope's recipients: each mailbox once, where it first occurs. Sorting keeps this
// O(n log n) for the longest lists [jobs] max_recipients allows.
std::vector<std::string> unique_mailboxes(const std::vector<std::string_view>& addr_specs) {
  std::vector<std::string> out;
  out.reserve(addr_specs.size());
  if (addr_specs.size() < 2) {
    for (const std::string_view addr_spec : addr_specs) out.emplace_back(addr_spec);
    return out;
  }
  // By mailbox, and by position among equal ones: the first of each run is kept.
  std::vector<std::size_t> order(addr_specs.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    if (mailbox_less(addr_specs[a], addr_specs[b])) return true;
    if (mailbox_less(addr_specs[b], addr_specs[a])) return false;
    return a < b;
  });
  std::vector<bool> kept(addr_specs.size());
  for (std::size_t i = 0; i < order.size(); ++i) {
    kept[order[i]] = i == 0 || mailbox_less(addr_specs[order[i - 1]], addr_specs[order[i]]);
  }
  for (std::size_t i = 0; i < addr_specs.size(); ++i) {
    if (kept[i]) out.emplace_back(addr_specs[i]);
  }
  return out;
}

// RFC 5322 3.3 date-time, always in UTC: "Sat, 21 Nov 2026 14:03:32 +0000". The second is the
// one system_clock::to_time_t gives (truncated toward zero, as gmtime got it before).
void append_rfc5322_date(std::string& out, std::chrono::system_clock::time_point when) {
  using namespace std::chrono;
  static constexpr std::array<std::string_view, 7> kDays = {"Sun", "Mon", "Tue", "Wed",
                                                            "Thu", "Fri", "Sat"};
  static constexpr std::array<std::string_view, 12> kMonths = {
      "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  const sys_seconds time{duration_cast<seconds>(when.time_since_epoch())};
  const sys_days day = floor<days>(time);
  const year_month_day date{day};
  const hh_mm_ss clock{time - day};
  const auto two_digits = [&out](long value) {
    const char digits[2] = {static_cast<char>('0' + value / 10),
                            static_cast<char>('0' + value % 10)};
    out.append(digits, 2);
  };
  out += kDays[weekday{day}.c_encoding()];
  out += ", ";
  two_digits(static_cast<unsigned>(date.day()));
  out += ' ';
  out += kMonths[static_cast<unsigned>(date.month()) - 1];
  out += ' ';
  // Four digits: system_clock's nanoseconds in 64 bits span the years 1677 to 2262.
  const int year = static_cast<int>(date.year());
  two_digits(year / 100);
  two_digits(year % 100);
  out += ' ';
  two_digits(clock.hours().count());
  out += ':';
  two_digits(clock.minutes().count());
  out += ':';
  two_digits(clock.seconds().count());
  out += " +0000";
}

// "=_" never occurs in quoted-printable output ("=" is always followed by two hex digits or a
// line break), so a boundary starting with it cannot collide with a part's content; the random
// rest keeps nested or forwarded messages apart.
// 128 random bits in hex. The generator is seeded once per thread from std::random_device,
// whose set-up (a device or CPU instruction probe) per message cost more than the rest of the
// boundary; a boundary needs to be unpredictable enough not to occur in the text, not secret.
constexpr std::string_view kBoundaryPrefix = "=_squall_";
using Boundary = std::array<char, kBoundaryPrefix.size() + 32>;

Boundary make_boundary() {
  thread_local std::mt19937_64 random{[] {
    std::random_device device;
    std::seed_seq seed{device(), device(), device(), device()};
    return std::mt19937_64(seed);
  }()};
  static constexpr char kHex[] = "0123456789abcdef";
  Boundary boundary;
  std::size_t at = kBoundaryPrefix.copy(boundary.data(), kBoundaryPrefix.size());
  for (int half = 0; half < 2; ++half) {
    const std::uint64_t bits = random();
    for (int shift = 60; shift >= 0; shift -= 4) boundary[at++] = kHex[(bits >> shift) & 0xf];
  }
  return boundary;
}

void append_part_headers(std::string& out, std::string_view subtype) {
  out += "Content-Type: text/";
  out += subtype;
  out += "; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n";
}

// build_mime's message and, with `envelope`, its envelope too (what envelope_sender and
// envelope_recipients return), from one parse of each address. The checks and their order are
// build_mime's; a Bcc address, which only the envelope has, is checked last, as
// envelope_recipients does.
std::string write_message(const Email& email, std::string_view default_from,
                          std::string_view message_id, std::chrono::system_clock::time_point date,
                          OutgoingMessage* envelope) {
  if (message_id.starts_with('<') && message_id.ends_with('>') && message_id.size() >= 2) {
    message_id = message_id.substr(1, message_id.size() - 2);
  }
  const auto unfit = [](char c) { return c <= ' ' || c > '~' || c == '<' || c == '>'; };
  if (message_id.empty() || std::any_of(message_id.begin(), message_id.end(), unfit)) {
    throw std::invalid_argument(
        "build_mime: the Message-ID is empty or has characters other "
        "than printable ASCII");
  }
  if (has_cr_lf_nul(email.subject) || !valid_utf8(email.subject)) {
    throw std::invalid_argument("build_mime: the subject has CR, LF, NUL or invalid UTF-8");
  }
  const std::string_view from = email.from.empty() ? default_from : email.from;

  // Room for the headers (encoded-words make UTF-8 about 1.7 times longer) and for bodies
  // that are mostly ASCII, so that most messages are written without growing the string.
  std::size_t header_bytes = from.size() + email.reply_to.size() + email.subject.size();
  for (const auto* list : {&email.to, &email.cc}) {
    for (const std::string& address : *list) header_bytes += address.size() + 2;
  }
  std::string out;
  out.reserve(512 + header_bytes * 2 + (email.text.size() + email.html.size()) * 11 / 10);
  std::vector<std::string_view> recipients;
  std::vector<std::string_view>* wanted = envelope != nullptr ? &recipients : nullptr;
  if (envelope != nullptr) {
    recipients.reserve(email.to.size() + email.cc.size() + email.bcc.size());
  }
  Mailbox mailbox;  // Each address in turn, its display name's buffer reused.

  out += "Date: ";
  append_rfc5322_date(out, date);
  out += "\r\nMessage-ID: <";
  out += message_id;
  out += ">\r\n";
  {
    if (auto reason = parse_mailbox(from, mailbox)) throw_invalid_address("from", *reason);
    if (envelope != nullptr) envelope->sender = mailbox.addr_spec;
    HeaderWriter header(out, "From");
    add_mailbox(header, mailbox, false);
    header.end();
  }
  if (!email.to.empty()) write_address_list(out, "To", email.to, mailbox, wanted);
  if (!email.cc.empty()) write_address_list(out, "Cc", email.cc, mailbox, wanted);
  // Bcc recipients are only in the envelope: a Bcc header would show them to everyone.
  if (!email.reply_to.empty()) {
    if (auto reason = parse_mailbox(email.reply_to, mailbox)) {
      throw_invalid_address("reply_to", *reason);
    }
    HeaderWriter header(out, "Reply-To");
    add_mailbox(header, mailbox, false);
    header.end();
  }
  {
    HeaderWriter header(out, "Subject");
    if (!email.subject.empty()) {
      add_unstructured(header, email.subject, kHeaderLine - (sizeof "Subject: " - 1));
    }
    header.end();
  }
  out += "MIME-Version: 1.0\r\n";

  const bool text = !email.text.empty();
  const bool html = !email.html.empty();
  if (text && html) {
    const Boundary boundary_chars = make_boundary();
    const std::string_view boundary(boundary_chars.data(), boundary_chars.size());
    out += "Content-Type: multipart/alternative;\r\n boundary=\"";
    out += boundary;
    out += "\"\r\n";
    const auto part = [&](std::string_view subtype, std::string_view body) {
      out += "\r\n--";
      out += boundary;
      out += "\r\n";
      append_part_headers(out, subtype);
      out += "\r\n";
      append_quoted_printable(out, body);
    };
    // The plain text comes first: multipart/alternative lists the parts in increasing order of
    // preference (RFC 2046 5.1.4).
    part("plain", email.text);
    part("html", email.html);
    out += "\r\n--";
    out += boundary;
    out += "--\r\n";
  } else {
    append_part_headers(out, html ? "html" : "plain");
    out += "\r\n";
    append_quoted_printable(out, html ? email.html : email.text);
  }

  if (envelope != nullptr) {
    for (const std::string& address : email.bcc) {
      std::string_view addr_spec;
      if (auto reason = check_address_text(address, addr_spec, nullptr)) {
        throw_invalid_address("envelope_recipients: a recipient", *reason);
      }
      recipients.push_back(addr_spec);
    }
    envelope->recipients = unique_mailboxes(recipients);
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

namespace {

// parse_address without copies: on success returns nullopt, sets addr_spec to the bare address
// inside text and, when display_name is not null, stores the unquoted display name there (only
// then is anything allocated). On failure returns the reason.
std::optional<std::string> check_address_text(std::string_view text, std::string_view& addr_spec,
                                              std::string* display_name) {
  if (text.empty()) return std::string("is empty");
  // One pass tells whether any of the three checks below can refuse (CR, LF and NUL are
  // control characters too); they report in this order.
  bool control = false, non_ascii = false;
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    control |= is_control(c);
    non_ascii |= c >= 0x80;
  }
  if (control && has_cr_lf_nul(text)) return std::string("contains CR, LF or NUL");
  if (non_ascii && !valid_utf8(text)) return std::string("is not valid UTF-8");
  if (control) return std::string("contains a control character");
  if (text.back() != '>') {
    if (text.find('<') != std::string_view::npos) return std::string("has a < without a >");
    if (text.find(' ') != std::string_view::npos) {
      return std::string("contains whitespace (a display name takes the form Name <local@domain>)");
    }
    addr_spec = text;
    return check_addr_spec(text);
  }
  if (text.front() == ' ') return std::string("starts with whitespace");
  std::size_t open = 0;
  if (text.front() == '"') {
    std::size_t i = 1;
    for (; i < text.size() && text[i] != '"'; ++i) {
      if (text[i] == '\\') {
        if (++i >= text.size()) break;
      }
      if (display_name != nullptr) *display_name += text[i];
    }
    if (i >= text.size()) return std::string("has a quoted display name that is not closed");
    open = i + 1;
    while (open < text.size() && text[open] == ' ') ++open;
    if (open >= text.size() || text[open] != '<') {
      return std::string("has text between the quoted display name and <");
    }
  } else {
    open = text.find('<');
    if (open == std::string_view::npos) return std::string("has a > without a <");
    std::string_view raw = text.substr(0, open);
    while (!raw.empty() && raw.back() == ' ') raw.remove_suffix(1);
    if (raw.find('"') != std::string_view::npos) {
      return std::string("has a \" in a display name that is not a quoted string");
    }
    if (raw.find('>') != std::string_view::npos) return std::string("has a > before the <");
    if (display_name != nullptr) *display_name = raw;
  }
  const std::string_view inner = text.substr(open + 1, text.size() - open - 2);
  // A plain loop: find_first_of calls memchr on the two characters for every byte.
  for (const char c : inner) {
    if (c == '<' || c == '>') return std::string("has more than one <...>");
  }
  if (inner.find(' ') != std::string_view::npos) {
    return std::string("contains whitespace inside <...>");
  }
  addr_spec = inner;
  return check_addr_spec(inner);
}

}  // namespace

std::variant<Address, std::string> parse_address(std::string_view text) {
  Address address;
  std::string_view addr_spec;
  if (auto error = check_address_text(text, addr_spec, &address.display_name)) {
    return std::move(*error);
  }
  address.addr_spec = addr_spec;
  return address;
}

std::string_view bare_address(std::string_view valid_address) noexcept {
  if (valid_address.empty() || valid_address.back() != '>') return valid_address;
  // The <...> of a valid address holds no < or >, while a quoted display name may: the last <
  // opens it.
  const std::size_t open = valid_address.rfind('<');
  if (open == std::string_view::npos) return valid_address;
  return valid_address.substr(open + 1, valid_address.size() - open - 2);
}

namespace {

// The DOM path: the whole body as an nlohmann::json document, then each field. It defines what a
// refusal says (and which one comes first when a body has several faults); EmailRequestParser
// asks it to explain every body its one-pass scan refuses.
std::variant<Email, FieldError> parse_email_fields(std::string_view json_body,
                                                   const EmailLimits& limits) {
  Json doc;
  try {
    std::set<std::string> seen;
    // Duplicate keys are refused: parsers disagree on which one wins, so a proxy and squall
    // could read different recipients from the same body.
    doc = Json::parse(json_body.begin(), json_body.end(),
                      [&seen](int depth, Json::parse_event_t event, Json& parsed) {
                        if (event == Json::parse_event_t::key && depth == 1 &&
                            !seen.insert(parsed.get<std::string>()).second) {
                          throw DuplicateKey{parsed.get<std::string>()};
                        }
                        return true;
                      });
  } catch (const DuplicateKey& duplicate) {
    return FieldError{duplicate.key, "appears more than once"};
  } catch (const Json::parse_error& error) {
    return json_error(json_body, error);
  } catch (const Json::out_of_range&) {
    // A number that does not fit a double (1e999): name the field it is in.
    PathTracker tracker;
    Json::sax_parse(json_body.begin(), json_body.end(), &tracker);
    const std::string field = tracker.field();
    return FieldError{field.empty() ? "body" : field,
                      "is a number out of range (a JSON number must fit a double)"};
  } catch (const Json::exception& error) {
    return FieldError{"body", std::string("is not valid JSON: ") + error.what()};
  }
  if (!doc.is_object()) return FieldError{"body", "must be a JSON object"};
  for (const auto& item : doc.items()) {
    bool known = false;
    for (const auto field : kRequestFields) known = known || item.key() == field;
    if (!known) {
      return FieldError{item.key(),
                        "is not a known field (known: to, cc, bcc, from, reply_to, subject, "
                        "text, html)"};
    }
  }

  Email email;
  std::size_t recipients = 0;
  if (auto e = get_recipients(doc, "to", true, limits, recipients, email.to)) return *e;
  if (auto e = get_recipients(doc, "cc", false, limits, recipients, email.cc)) return *e;
  if (auto e = get_recipients(doc, "bcc", false, limits, recipients, email.bcc)) return *e;
  const std::array<std::pair<const char*, std::string*>, 2> senders = {
      {{"from", &email.from}, {"reply_to", &email.reply_to}}};
  for (const auto& [name, target] : senders) {
    if (auto e = get_string(doc, name, false, *target)) return *e;
    // Present means it must be an address: "" is not a way to ask for the default sender.
    if (const auto it = doc.find(name); it != doc.end() && !it->is_null()) {
      if (auto e = check_address(name, *target)) return *e;
    }
  }
  if (auto e = get_string(doc, "subject", true, email.subject)) return *e;
  if (auto e = check_subject(email.subject)) return *e;
  if (auto e = get_string(doc, "text", false, email.text)) return *e;
  if (auto e = get_string(doc, "html", false, email.html)) return *e;
  if (!valid_utf8(email.text)) return FieldError{"text", "is not valid UTF-8"};
  if (!valid_utf8(email.html)) return FieldError{"html", "is not valid UTF-8"};
  if (email.text.empty() && email.html.empty()) {
    return FieldError{"text", "is required: give text or html (or both), not empty"};
  }

  std::size_t bytes = 0;
  const std::array<std::pair<const char*, const std::string*>, 3> parts = {
      {{"subject", &email.subject}, {"text", &email.text}, {"html", &email.html}}};
  for (const auto& [name, value] : parts) {
    bytes += value->size();
    if (bytes > limits.max_email_bytes) {
      const std::size_t total = email.subject.size() + email.text.size() + email.html.size();
      return FieldError{name, "makes the email too large: subject + text + html are " +
                                  std::to_string(total) + " bytes, at most " +
                                  std::to_string(limits.max_email_bytes) + " are allowed"};
    }
  }
  return email;
}

}  // namespace

namespace {

// parse_email_fields, with the refusals that would name no field (an empty JSON key, repeated or
// unknown) naming the body: every refusal names a field.
std::variant<Email, FieldError> parse_email_dom(std::string_view json_body,
                                                const EmailLimits& limits) {
  auto parsed = parse_email_fields(json_body, limits);
  if (auto* error = std::get_if<FieldError>(&parsed); error != nullptr && error->field.empty()) {
    error->field = "body";
    error->message = "has a field with an empty name: " + error->message;
  }
  return parsed;
}

// ---------------------------------------------------------------------------------------------
// The stored form, written as nlohmann::json's dump() writes it

// The first byte in [p, end) that a JSON string cannot hold as it is: a quote, a backslash or a
// control character (below 0x20); end if there is none. Sets `non_ascii` if a byte of 0x80 or
// above comes before it. Sixteen bytes at a time where SSE2 is there: the strings of a request
// are mostly runs of plain ASCII.
const char* find_json_special(const char* p, const char* end, bool& non_ascii) {
#if defined(__SSE2__)
  const __m128i quote = _mm_set1_epi8('"');
  const __m128i backslash = _mm_set1_epi8('\\');
  const __m128i below_space = _mm_set1_epi8(0x1f);
  while (end - p >= 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    // max(b, 0x1f) == 0x1f exactly when b <= 0x1f, unsigned.
    const __m128i control = _mm_cmpeq_epi8(_mm_max_epu8(bytes, below_space), below_space);
    const __m128i special = _mm_or_si128(
        control, _mm_or_si128(_mm_cmpeq_epi8(bytes, quote), _mm_cmpeq_epi8(bytes, backslash)));
    const auto special_bits = static_cast<unsigned>(_mm_movemask_epi8(special));
    const auto high_bits = static_cast<unsigned>(_mm_movemask_epi8(bytes));
    if (special_bits != 0) {
      const unsigned before = (special_bits & -special_bits) - 1;  // The bytes before it.
      non_ascii |= (high_bits & before) != 0;
      return p + __builtin_ctz(special_bits);
    }
    non_ascii |= high_bits != 0;
    p += 16;
  }
#endif
  for (; p < end; ++p) {
    const auto c = static_cast<unsigned char>(*p);
    if (c < 0x20 || c == '"' || c == '\\') return p;
    non_ascii |= c >= 0x80;
  }
  return end;
}

// A string as dump() writes it (ensure_ascii off): the quote, the backslash and the control
// characters U+0000..U+001F escaped (\b \t \n \f \r by name, the others as \u00xx), every other
// byte as it is. s must be valid UTF-8.
void append_json_string(std::string& out, std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  out.push_back('"');
  const char* run = s.data();  // The first byte not yet copied.
  const char* const end = s.data() + s.size();
  bool non_ascii = false;  // Not needed here: s is valid UTF-8.
  for (const char* p = find_json_special(run, end, non_ascii); p != end;
       p = find_json_special(run, end, non_ascii)) {
    out.append(run, static_cast<std::size_t>(p - run));
    run = p + 1;
    const auto c = static_cast<unsigned char>(*p);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\r':
        out += "\\r";
        break;
      default: {
        const char escape[] = {'\\', 'u', '0', '0', kHex[c >> 4], kHex[c & 0xf]};
        out.append(escape, sizeof escape);
      }
    }
  }
  out.append(run, static_cast<std::size_t>(end - run));
  out.push_back('"');
}

template <typename List>
void append_json_list(std::string& out, const List& list) {
  out.push_back('[');
  bool first = true;
  for (const auto& element : list) {
    if (!first) out.push_back(',');
    first = false;
    append_json_string(out, element);
  }
  out.push_back(']');
}

// The stored form of an email with no field set: what every stored form adds to its strings.
constexpr std::string_view kEmptyStoredForm =
    R"({"from":"","to":[],"cc":[],"bcc":[],"reply_to":"","subject":"","text":"","html":""})";

template <typename List>
void append_stored_form(std::string& out, std::string_view from, const List& to, const List& cc,
                        const List& bcc, std::string_view reply_to, std::string_view subject,
                        std::string_view text, std::string_view html) {
  out.append(std::string_view(R"({"from":)"));
  append_json_string(out, from);
  out.append(std::string_view(R"(,"to":)"));
  append_json_list(out, to);
  out.append(std::string_view(R"(,"cc":)"));
  append_json_list(out, cc);
  out.append(std::string_view(R"(,"bcc":)"));
  append_json_list(out, bcc);
  out.append(std::string_view(R"(,"reply_to":)"));
  append_json_string(out, reply_to);
  out.append(std::string_view(R"(,"subject":)"));
  append_json_string(out, subject);
  out.append(std::string_view(R"(,"text":)"));
  append_json_string(out, text);
  out.append(std::string_view(R"(,"html":)"));
  append_json_string(out, html);
  out.push_back('}');
}

// ---------------------------------------------------------------------------------------------
// The one-pass scan of a request body

// The request fields by their index in kRequestFields.
enum RequestField : std::size_t { kTo, kCc, kBcc, kFrom, kReplyTo, kSubject, kText, kHtml };
constexpr std::size_t kFieldCount = kRequestFields.size();
static_assert(kRequestFields[kTo] == "to" && kRequestFields[kHtml] == "html");

bool is_json_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

void append_utf8(std::string& out, std::uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xc0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xe0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else {
    out.push_back(static_cast<char>(0xf0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
}

// A cursor over the body. The scan takes the JSON a valid request is made of (one object whose
// values are strings, null or arrays of strings) and refuses everything else, numbers and
// nested objects included: those are faults in a request, which the DOM path then explains.
class BodyScanner {
 public:
  BodyScanner(std::string_view body, std::string& decoded)
      : body_(body), p_(body.data()), end_(body.data() + body.size()), decoded_(decoded) {
    // nlohmann's lexer skips a UTF-8 byte order mark at the start.
    if (body.starts_with("\xEF\xBB\xBF")) p_ += 3;
  }

  void skip_space() {
    while (p_ < end_ && is_json_space(*p_)) ++p_;
  }
  bool take(char c) {
    if (p_ == end_ || *p_ != c) return false;
    ++p_;
    return true;
  }
  bool take_null() {
    if (end_ - p_ < 4 || std::string_view(p_, 4) != "null") return false;
    p_ += 4;
    return true;
  }
  bool at(char c) const { return p_ < end_ && *p_ == c; }
  bool at_end() const { return p_ == end_; }
  std::size_t decoded_mark() const { return decoded_.size(); }
  void drop_decoded(std::size_t mark) { decoded_.resize(mark); }

  // The JSON string at the cursor (at its opening quote): a view into the body when it has no
  // escapes, else decoded at the end of decoded_. False on what nlohmann's lexer refuses: a
  // control character, an unknown escape, a lone surrogate, bytes that are not UTF-8.
  bool string(std::string_view& out) {
    if (!take('"')) return false;
    const char* const start = p_;
    bool non_ascii = false;
    p_ = find_json_special(p_, end_, non_ascii);
    if (p_ == end_ || static_cast<unsigned char>(*p_) < 0x20) return false;
    if (*p_ == '"') {
      out = std::string_view(start, static_cast<std::size_t>(p_ - start));
      ++p_;
      return !non_ascii || valid_utf8(out);
    }
    // Decoded strings are never longer than their JSON text, so with the body's size reserved
    // decoded_ never moves and earlier views into it stay valid.
    decoded_.reserve(body_.size());
    const std::size_t begin = decoded_.size();
    decoded_.append(start, p_);
    while (true) {
      if (p_ == end_) return false;
      const auto c = static_cast<unsigned char>(*p_++);
      if (c == '"') break;
      if (c < 0x20) return false;
      if (c != '\\') {
        non_ascii |= c >= 0x80;
        decoded_.push_back(static_cast<char>(c));
        continue;
      }
      if (p_ == end_) return false;
      switch (*p_++) {
        case '"':
          decoded_.push_back('"');
          break;
        case '\\':
          decoded_.push_back('\\');
          break;
        case '/':
          decoded_.push_back('/');
          break;
        case 'b':
          decoded_.push_back('\b');
          break;
        case 'f':
          decoded_.push_back('\f');
          break;
        case 'n':
          decoded_.push_back('\n');
          break;
        case 'r':
          decoded_.push_back('\r');
          break;
        case 't':
          decoded_.push_back('\t');
          break;
        case 'u': {
          std::uint32_t cp = 0;
          if (!hex4(cp)) return false;
          if (cp >= 0xdc00 && cp <= 0xdfff) return false;  // A low surrogate first.
          if (cp >= 0xd800 && cp <= 0xdbff) {
            std::uint32_t low = 0;
            if (!take('\\') || !take('u') || !hex4(low) || low < 0xdc00 || low > 0xdfff) {
              return false;
            }
            cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
          }
          append_utf8(decoded_, cp);
          break;
        }
        default:
          return false;
      }
    }
    out = std::string_view(decoded_.data() + begin, decoded_.size() - begin);
    // Escapes decode to whole UTF-8 sequences, so checking the result checks the raw bytes.
    return !non_ascii || valid_utf8(out);
  }

 private:
  bool hex4(std::uint32_t& value) {
    if (end_ - p_ < 4) return false;
    for (int i = 0; i < 4; ++i) {
      const int digit = hex_digit(*p_++);
      if (digit < 0) return false;
      value = value * 16 + static_cast<std::uint32_t>(digit);
    }
    return true;
  }

  std::string_view body_;  // The whole body.
  const char* p_;          // The next byte to read.
  const char* end_;        // The end of the body.
  std::string& decoded_;   // Where strings with escapes are decoded.
};

// What the scan saw of one request field.
struct ScannedField {
  bool present = false;              // The key appeared (with any value, null included).
  bool is_null = false;              // Its value was null.
  std::string_view text;             // A string value.
  bool is_list = false;              // A recipient field whose value was an array.
  std::size_t first = 0, count = 0;  // A recipient field: its addresses in recipients_.
};

// The field a key names, or kFieldCount.
std::size_t field_of(std::string_view key) {
  for (std::size_t i = 0; i < kFieldCount; ++i) {
    if (kRequestFields[i] == key) return i;
  }
  return kFieldCount;
}

}  // namespace

bool EmailRequestParser::scan(std::string_view json_body, const EmailLimits& limits) {
  decoded_.clear();
  recipients_.clear();
  std::array<ScannedField, kFieldCount> fields{};
  BodyScanner in(json_body, decoded_);
  in.skip_space();
  if (!in.take('{')) return false;
  in.skip_space();
  if (!in.take('}')) {
    while (true) {
      std::string_view key;
      const std::size_t mark = in.decoded_mark();
      if (!in.string(key)) return false;
      const std::size_t index = field_of(key);
      in.drop_decoded(mark);  // The key is not needed any more.
      if (index == kFieldCount || fields[index].present) return false;  // Unknown, repeated.
      ScannedField& field = fields[index];
      field.present = true;
      in.skip_space();
      if (!in.take(':')) return false;
      in.skip_space();
      if (in.take_null()) {
        field.is_null = true;
      } else if (in.at('"')) {
        if (!in.string(field.text)) return false;
        if (index <= kBcc) {
          field.first = recipients_.size();
          field.count = 1;
          recipients_.push_back(field.text);
        }
      } else if (index <= kBcc && in.take('[')) {
        field.is_list = true;
        field.first = recipients_.size();
        in.skip_space();
        if (!in.take(']')) {
          while (true) {
            std::string_view address;
            if (!in.string(address)) return false;
            recipients_.push_back(address);
            in.skip_space();
            if (in.take(']')) break;
            if (!in.take(',')) return false;
            in.skip_space();
          }
        }
        field.count = recipients_.size() - field.first;
      } else {
        return false;
      }
      in.skip_space();
      if (in.take('}')) break;
      if (!in.take(',')) return false;
      in.skip_space();
    }
  }
  in.skip_space();
  // nlohmann's lexer takes a NUL byte for the end of the input, so the DOM path ignores what
  // follows one after the object; so does the scan, which must accept what the DOM path accepts.
  if (!in.at_end() && !in.at('\0')) return false;

  // The rules of parse_email_fields, as pass or fail.
  const ScannedField& to = fields[kTo];
  if (!to.present || to.is_null || (to.is_list && to.count == 0)) return false;
  if (recipients_.size() > limits.max_recipients) return false;
  for (const std::string_view address : recipients_) {
    if (!address_ok(address)) return false;
  }
  for (const std::size_t sender : {kFrom, kReplyTo}) {
    if (fields[sender].present && !fields[sender].is_null && !address_ok(fields[sender].text)) {
      return false;
    }
  }
  const ScannedField& subject = fields[kSubject];
  if (!subject.present || subject.is_null || check_subject(subject.text)) return false;
  const std::string_view text = fields[kText].text, html = fields[kHtml].text;
  if (text.empty() && html.empty()) return false;
  if (subject.text.size() + text.size() + html.size() > limits.max_email_bytes) return false;

  const auto list = [this](const ScannedField& field) {
    return std::span<const std::string_view>(recipients_.data() + field.first, field.count);
  };
  request_ =
      EmailRequestView{fields[kFrom].text, fields[kReplyTo].text, subject.text,      text, html,
                       list(to),           list(fields[kCc]),     list(fields[kBcc])};
  return true;
}

std::optional<FieldError> EmailRequestParser::parse(std::string_view json_body,
                                                    const EmailLimits& limits) {
  // A scratch buffer grown by a huge body is not kept for the small ones that follow.
  constexpr std::size_t kKeepScratchBytes = 64 * 1024;
  if (decoded_.capacity() > kKeepScratchBytes && json_body.size() <= kKeepScratchBytes) {
    std::string().swap(decoded_);
  }
  payload_.clear();
  scanned_ = scan(json_body, limits);
  if (!scanned_) {
    request_ = {};
    auto parsed = parse_email_dom(json_body, limits);
    if (auto* error = std::get_if<FieldError>(&parsed)) return std::move(*error);
    // Only a fault of the scan gets here (every valid request scans): the DOM's answer stands.
    fallback_ = std::move(std::get<Email>(parsed));
    recipients_.assign(fallback_.to.begin(), fallback_.to.end());
    recipients_.insert(recipients_.end(), fallback_.cc.begin(), fallback_.cc.end());
    recipients_.insert(recipients_.end(), fallback_.bcc.begin(), fallback_.bcc.end());
    const std::string_view* list = recipients_.data();
    request_ =
        EmailRequestView{fallback_.from,
                         fallback_.reply_to,
                         fallback_.subject,
                         fallback_.text,
                         fallback_.html,
                         {list, fallback_.to.size()},
                         {list + fallback_.to.size(), fallback_.cc.size()},
                         {list + fallback_.to.size() + fallback_.cc.size(), fallback_.bcc.size()}};
  }
  const EmailRequestView& r = request_;
  // Each string is at most as long in the stored form as in the body, so this is enough.
  payload_.reserve(json_body.size() + kEmptyStoredForm.size());
  append_stored_form(payload_, r.from, r.to, r.cc, r.bcc, r.reply_to, r.subject, r.text, r.html);
  return std::nullopt;
}

std::variant<Email, FieldError> parse_email_request(std::string_view json_body,
                                                    const EmailLimits& limits) {
  EmailRequestParser parser;
  if (auto error = parser.parse(json_body, limits)) return std::move(*error);
  const EmailRequestView& r = parser.request();
  Email email;
  email.from = r.from;
  email.to.assign(r.to.begin(), r.to.end());
  email.cc.assign(r.cc.begin(), r.cc.end());
  email.bcc.assign(r.bcc.begin(), r.bcc.end());
  email.reply_to = r.reply_to;
  email.subject = r.subject;
  email.text = r.text;
  email.html = r.html;
  return email;
}

namespace detail {

std::variant<Email, FieldError> parse_email_request_dom(std::string_view json_body,
                                                        const EmailLimits& limits) {
  return parse_email_dom(json_body, limits);
}

}  // namespace detail

std::string email_to_json(const Email& email) {
  const auto check = [](std::string_view field, std::string_view value) {
    if (!valid_utf8(value)) {
      throw std::invalid_argument("email_to_json: " + std::string(field) + " is not valid UTF-8");
    }
  };
  check("from", email.from);
  for (const auto* list : {&email.to, &email.cc, &email.bcc}) {
    for (const std::string& address : *list) check("an address", address);
  }
  check("reply_to", email.reply_to);
  check("subject", email.subject);
  check("text", email.text);
  check("html", email.html);
  std::string out;
  out.reserve(kEmptyStoredForm.size() + email.from.size() + email.reply_to.size() +
              email.subject.size() + email.text.size() + email.html.size() + 16);
  append_stored_form(out, email.from, email.to, email.cc, email.bcc, email.reply_to, email.subject,
                     email.text, email.html);
  return out;
}

namespace {

// Reads the stored form as append_stored_form writes it (every key, in its order, no spaces),
// without a DOM: a send reads each stored email once. nullopt for anything else (other spacing,
// key order, escapes it does not write, a string that is not UTF-8), which the DOM path then
// reads or refuses.
class StoredFormReader {
 public:
  explicit StoredFormReader(std::string_view json) : json_(json) {}

  std::optional<Email> read() {
    Email email;
    if (!literal(R"({"from":)") || !string(email.from) || !literal(R"(,"to":)") ||
        !list(email.to) || !literal(R"(,"cc":)") || !list(email.cc) || !literal(R"(,"bcc":)") ||
        !list(email.bcc) || !literal(R"(,"reply_to":)") || !string(email.reply_to) ||
        !literal(R"(,"subject":)") || !string(email.subject) || !literal(R"(,"text":)") ||
        !string(email.text) || !literal(R"(,"html":)") || !string(email.html) || !literal("}") ||
        at_ != json_.size()) {
      return std::nullopt;
    }
    return email;
  }

 private:
  bool literal(std::string_view expected) {
    if (json_.substr(at_, expected.size()) != expected) return false;
    at_ += expected.size();
    return true;
  }

  // A string as append_json_string writes it: the bytes up to the next quote, backslash or
  // control character copied at once, escapes decoded.
  bool string(std::string& out) {
    if (at_ >= json_.size() || json_[at_] != '"') return false;
    ++at_;
    bool non_ascii = false;  // Only then can the bytes be other than UTF-8.
    for (;;) {
      std::size_t end = at_;
      while (end < json_.size()) {
        const auto c = static_cast<unsigned char>(json_[end]);
        if (c < 0x20 || c == '"' || c == '\\') break;
        non_ascii |= c >= 0x80;
        ++end;
      }
      out.append(json_.data() + at_, end - at_);
      at_ = end;
      if (at_ >= json_.size()) return false;
      const char c = json_[at_];
      if (c == '"') {
        ++at_;
        return !non_ascii || valid_utf8(out);
      }
      if (c != '\\' || at_ + 1 >= json_.size()) return false;  // A raw control character.
      // An escape that finds the string full: room for all the rest at once, rather than a
      // reallocation for the byte it decodes and again later.
      if (out.capacity() == out.size()) out.reserve(out.size() + raw_rest());
      const char escape = json_[at_ + 1];
      at_ += 2;
      switch (escape) {
        case '"':
        case '\\':
          out.push_back(escape);
          break;
        case 'b':
          out.push_back('\b');
          break;
        case 't':
          out.push_back('\t');
          break;
        case 'n':
          out.push_back('\n');
          break;
        case 'f':
          out.push_back('\f');
          break;
        case 'r':
          out.push_back('\r');
          break;
        case 'u': {
          // Only the control characters' \u00xx: anything else is left to the DOM path.
          if (json_.substr(at_, 2) != "00" || at_ + 4 > json_.size()) return false;
          const int high = hex_digit(json_[at_ + 2]), low = hex_digit(json_[at_ + 3]);
          if (high < 0 || high > 1 || low < 0) return false;
          out.push_back(static_cast<char>(high * 16 + low));
          at_ += 4;
          break;
        }
        default:
          return false;
      }
    }
  }

  // The raw length of the rest of the string at at_, up to its closing quote (or the end of the
  // text): at most what its decoded rest takes.
  std::size_t raw_rest() const {
    std::size_t end = at_;
    while (end < json_.size() && json_[end] != '"') end += json_[end] == '\\' ? 2 : 1;
    return std::min(end, json_.size()) - at_;
  }

  bool list(std::vector<std::string>& out) {
    if (!literal("[")) return false;
    if (literal("]")) return true;
    for (;;) {
      if (!string(out.emplace_back())) return false;
      if (literal("]")) return true;
      if (!literal(",")) return false;
    }
  }

  std::string_view json_;
  std::size_t at_ = 0;
};

Email email_from_json_dom(std::string_view json) {
  Json doc;
  try {
    doc = Json::parse(json.begin(), json.end());
  } catch (const Json::parse_error& error) {
    throw std::invalid_argument(std::string("stored email is not valid JSON: ") + error.what());
  }
  if (!doc.is_object()) throw std::invalid_argument("stored email is not a JSON object");
  Email email;
  for (const auto& item : doc.items()) {
    const std::string& key = item.key();
    const Json& value = item.value();
    std::string* text = key == "from"       ? &email.from
                        : key == "reply_to" ? &email.reply_to
                        : key == "subject"  ? &email.subject
                        : key == "text"     ? &email.text
                        : key == "html"     ? &email.html
                                            : nullptr;
    std::vector<std::string>* list = key == "to"    ? &email.to
                                     : key == "cc"  ? &email.cc
                                     : key == "bcc" ? &email.bcc
                                                    : nullptr;
    if (text != nullptr) {
      if (!value.is_string())
        throw std::invalid_argument("stored email: " + key + " is not a string");
      *text = value.get<std::string>();
    } else if (list != nullptr) {
      if (!value.is_array())
        throw std::invalid_argument("stored email: " + key + " is not an array");
      for (const Json& element : value) {
        if (!element.is_string()) {
          throw std::invalid_argument("stored email: " + key +
                                      " has an element that is not a string");
        }
        list->push_back(element.get<std::string>());
      }
    } else {
      throw std::invalid_argument("stored email: unknown field " + key);
    }
  }
  return email;
}

}  // namespace

Email email_from_json(std::string_view json) {
  if (auto email = StoredFormReader(json).read()) return std::move(*email);
  return email_from_json_dom(json);
}

namespace detail {

Email email_from_json_dom(std::string_view json) {
  return mail::email_from_json_dom(json);
}

bool reads_stored_form_directly(std::string_view json) {
  return StoredFormReader(json).read().has_value();
}

}  // namespace detail

std::string build_mime(const Email& email, std::string_view default_from,
                       std::string_view message_id, std::chrono::system_clock::time_point date) {
  return write_message(email, default_from, message_id, date, nullptr);
}

OutgoingMessage prepare_message(const Email& email, std::string_view default_from,
                                std::string_view message_id,
                                std::chrono::system_clock::time_point date) {
  OutgoingMessage message;
  message.mime = write_message(email, default_from, message_id, date, &message);
  return message;
}

std::string make_message_id(std::string_view job_id, std::string_view domain) {
  if (job_id.empty()) throw std::invalid_argument("make_message_id: the job id is empty");
  std::string_view right;
  if (domain.find('@') != std::string_view::npos) {
    std::string_view addr_spec;
    if (auto reason = check_address_text(domain, addr_spec, nullptr)) {
      throw_invalid_address("make_message_id: the sender", *reason);
    }
    right = addr_spec.substr(addr_spec.rfind('@') + 1);
  } else {
    if (auto error = check_domain(domain)) {
      throw std::invalid_argument("make_message_id: the domain " + *error);
    }
    right = domain;
  }
  std::string id;
  id.reserve(job_id.size() + 1 + right.size());
  std::size_t kept = 0;  // Where the characters not yet appended start.
  for (std::size_t i = 0; i < job_id.size(); ++i) {
    const auto c = static_cast<unsigned char>(job_id[i]);
    // "." is escaped too: dot-atom-text forbids leading, trailing and double dots.
    if (is_atext(c) && c != '=') continue;
    id.append(job_id, kept, i - kept);
    append_hex_escape(id, '=', c);
    kept = i + 1;
  }
  id.append(job_id, kept);
  id += '@';
  id += right;
  return id;
}

std::vector<std::string> envelope_recipients(const Email& email) {
  std::vector<std::string_view> addr_specs;
  addr_specs.reserve(email.to.size() + email.cc.size() + email.bcc.size());
  for (const auto* list : {&email.to, &email.cc, &email.bcc}) {
    for (const std::string& text : *list) {
      std::string_view addr_spec;
      if (auto reason = check_address_text(text, addr_spec, nullptr)) {
        throw_invalid_address("envelope_recipients: a recipient", *reason);
      }
      addr_specs.push_back(addr_spec);
    }
  }
  return unique_mailboxes(addr_specs);
}

std::string envelope_sender(const Email& email, std::string_view default_from) {
  const std::string_view from = email.from.empty() ? default_from : email.from;
  std::string_view addr_spec;
  if (auto reason = check_address_text(from, addr_spec, nullptr)) {
    throw_invalid_address("envelope_sender: the sender", *reason);
  }
  return std::string(addr_spec);
}

}  // namespace squall::mail

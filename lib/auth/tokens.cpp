#include "squall/auth/tokens.hpp"

#include <arpa/inet.h>
#include <sys/random.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <system_error>

#include <openssl/crypto.h>
#include <openssl/evp.h>

namespace squall::auth {

namespace {

constexpr std::size_t kTokenRandomBytes = 32;
constexpr std::string_view kTokenPrefix = "sqt_";
constexpr std::string_view kHashPrefix = "sha256:";
constexpr std::string_view kFromPrefix = "from=";
// Far above a real token; a longer credential is refused without hashing it.
constexpr std::size_t kMaxTokenBytes = 1024;

int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool iequals_ascii(std::string_view a, std::string_view b) noexcept {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    char x = a[i];
    char y = b[i];
    if (x >= 'A' && x <= 'Z') x = static_cast<char>(x - 'A' + 'a');
    if (y >= 'A' && y <= 'Z') y = static_cast<char>(y - 'A' + 'a');
    if (x != y) return false;
  }
  return true;
}

// A from= entry: "local@domain" or "@domain", without spaces, commas or control characters.
bool is_sender_pattern(std::string_view text) noexcept {
  const std::size_t at = text.find('@');
  if (at == std::string_view::npos || at + 1 >= text.size() ||
      text.find('@', at + 1) != std::string_view::npos) {
    return false;
  }
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u >= 0x7f || c == ',' || c == '<' || c == '>') return false;
  }
  return true;
}

}  // namespace

Digest sha256(std::string_view data) {
  Digest digest{};
  unsigned int length = 0;
  if (EVP_Digest(data.data(), data.size(), digest.data(), &length, EVP_sha256(), nullptr) != 1 ||
      length != digest.size()) {
    throw std::runtime_error("SHA-256 failed (OpenSSL EVP_Digest)");
  }
  return digest;
}

std::string to_hex(const Digest& digest) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string text;
  text.reserve(digest.size() * 2);
  for (const unsigned char byte : digest) {
    text += kDigits[byte >> 4];
    text += kDigits[byte & 0xf];
  }
  return text;
}

bool is_token_name(std::string_view name) noexcept {
  if (name.empty() || name.size() > 64) return false;
  for (const char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

NewToken generate_token(std::string_view name) {
  if (!is_token_name(name)) {
    throw std::invalid_argument("token name \"" + std::string(name) +
                                "\": use 1 to 64 letters, digits, '.', '_' or '-'");
  }
  unsigned char random[kTokenRandomBytes];
  std::size_t filled = 0;
  while (filled < sizeof random) {
    const ssize_t got = ::getrandom(random + filled, sizeof random - filled, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      throw std::system_error(errno, std::generic_category(), "getrandom");
    }
    filled += static_cast<std::size_t>(got);
  }
  Digest as_digest{};
  std::memcpy(as_digest.data(), random, sizeof random);
  NewToken made;
  made.token = std::string(kTokenPrefix) + to_hex(as_digest);
  made.line = std::string(name) + " " + std::string(kHashPrefix) + to_hex(sha256(made.token));
  OPENSSL_cleanse(random, sizeof random);
  return made;
}

std::vector<Token> parse_tokens(std::string_view text, const std::string& source) {
  std::vector<Token> tokens;
  std::size_t line_number = 0;
  while (!text.empty()) {
    ++line_number;
    const std::size_t end = text.find('\n');
    std::string_view line = text.substr(0, end);
    text = end == std::string_view::npos ? std::string_view() : text.substr(end + 1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    const auto fail = [&](const std::string& message) {
      throw std::runtime_error(source + ":" + std::to_string(line_number) + ": " + message);
    };
    // Split on spaces and tabs.
    std::vector<std::string_view> words;
    std::size_t i = 0;
    while (i < line.size()) {
      while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) ++i;
      const std::size_t start = i;
      while (i < line.size() && line[i] != ' ' && line[i] != '\t') ++i;
      if (i > start) words.push_back(line.substr(start, i - start));
    }
    if (words.empty() || words.front().front() == '#') continue;
    if (words.size() < 2 || words.size() > 3) {
      fail("expected \"NAME sha256:HEX\" optionally followed by \"from=ADDRESS,@DOMAIN\"");
    }
    Token token;
    if (!is_token_name(words[0])) {
      fail("token name \"" + std::string(words[0].substr(0, 64)) +
           "\": use 1 to 64 letters, digits, '.', '_' or '-'");
    }
    token.name = std::string(words[0]);
    const std::string_view hash = words[1];
    if (hash.substr(0, kHashPrefix.size()) != kHashPrefix ||
        hash.size() != kHashPrefix.size() + 64) {
      fail("token " + token.name +
           ": expected its hash as sha256: and 64 hex digits (squalld --new-token NAME prints "
           "the line)");
    }
    for (std::size_t k = 0; k < 32; ++k) {
      const int high = hex_value(hash[kHashPrefix.size() + 2 * k]);
      const int low = hex_value(hash[kHashPrefix.size() + 2 * k + 1]);
      if (high < 0 || low < 0) fail("token " + token.name + ": the hash is not hexadecimal");
      token.hash[k] = static_cast<unsigned char>(high * 16 + low);
    }
    if (words.size() == 3) {
      std::string_view from = words[2];
      if (from.substr(0, kFromPrefix.size()) != kFromPrefix || from.size() == kFromPrefix.size()) {
        fail("token " + token.name + ": expected from=ADDRESS,@DOMAIN,... after the hash");
      }
      from.remove_prefix(kFromPrefix.size());
      while (true) {
        const std::size_t comma = from.find(',');
        const std::string_view item = from.substr(0, comma);
        if (!is_sender_pattern(item)) {
          fail("token " + token.name + ": from= entry \"" + std::string(item.substr(0, 80)) +
               "\" is neither an address (a@example.com) nor a domain (@example.com)");
        }
        std::string lowered(item);
        for (char& c : lowered) {
          if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
        }
        token.senders.push_back(std::move(lowered));
        if (comma == std::string_view::npos) break;
        from.remove_prefix(comma + 1);
      }
    }
    for (const Token& other : tokens) {
      if (other.name == token.name) fail("token name " + token.name + " is listed twice");
      if (other.hash == token.hash) {
        fail("token " + token.name + " has the same hash as token " + other.name);
      }
    }
    tokens.push_back(std::move(token));
  }
  return tokens;
}

std::vector<Token> load_tokens_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw std::runtime_error(path + ": cannot read the tokens file: " +
                             std::error_code(errno, std::generic_category()).message());
  }
  std::ostringstream content;
  content << file.rdbuf();
  if (file.bad()) throw std::runtime_error(path + ": cannot read the tokens file");
  return parse_tokens(content.str(), path);
}

const Token* TokenSet::find(std::string_view presented) const noexcept {
  if (presented.empty() || presented.size() > kMaxTokenBytes) return nullptr;
  Digest digest{};
  try {
    digest = sha256(presented);
  } catch (...) {
    return nullptr;
  }
  const Token* found = nullptr;
  for (const Token& token : tokens_) {
    // No early exit: the time taken does not depend on which entry (if any) matches.
    const bool equal = CRYPTO_memcmp(token.hash.data(), digest.data(), digest.size()) == 0;
    if (equal && found == nullptr) found = &token;
  }
  return found;
}

std::optional<std::string_view> bearer_token(std::string_view authorization) noexcept {
  constexpr std::string_view kScheme = "bearer";
  if (authorization.size() <= kScheme.size() ||
      !iequals_ascii(authorization.substr(0, kScheme.size()), kScheme) ||
      (authorization[kScheme.size()] != ' ' && authorization[kScheme.size()] != '\t')) {
    return std::nullopt;
  }
  std::string_view token = authorization.substr(kScheme.size());
  while (!token.empty() && (token.front() == ' ' || token.front() == '\t')) token.remove_prefix(1);
  while (!token.empty() && (token.back() == ' ' || token.back() == '\t')) token.remove_suffix(1);
  if (token.empty()) return std::nullopt;
  return token;
}

bool is_loopback_address(std::string_view numeric_host) noexcept {
  char text[INET6_ADDRSTRLEN + 1] = {};
  if (numeric_host.empty() || numeric_host.size() >= sizeof text) return false;
  std::memcpy(text, numeric_host.data(), numeric_host.size());
  in_addr v4{};
  if (inet_pton(AF_INET, text, &v4) == 1) {
    return (ntohl(v4.s_addr) >> 24) == 127;
  }
  in6_addr v6{};
  if (inet_pton(AF_INET6, text, &v6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&v6)) return true;
    // ::ffff:127.x.y.z, as an IPv4 client of a dual-stack socket appears.
    return IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127;
  }
  return false;
}

}  // namespace squall::auth

// API tokens: random secrets handed to clients, of which only SHA-256 hashes are stored (in a
// tokens file, one "NAME sha256:HEX [from=...]" line each). A presented token is hashed and
// compared with every stored hash in constant time (CRYPTO_memcmp), so neither the file nor the
// timing of a refusal reveals a usable token. Tokens never appear in log lines or errors.
#pragma once

#include <array>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace squall::auth {

using Digest = std::array<unsigned char, 32>;

// SHA-256 (OpenSSL's libcrypto).
Digest sha256(std::string_view data);
// 64 lowercase hex digits.
std::string to_hex(const Digest& digest);

// One line of a tokens file.
struct Token {
  std::string name;                  // Letters, digits, '.', '_', '-': the owner of its jobs.
  Digest hash{};                     // SHA-256 of the token text.
  std::vector<std::string> senders;  // from=: addresses ("a@example.com") or domains
                                     // ("@example.com") its emails may come from; empty means
                                     // only the default sender.
};

// A new token (256 random bits from getrandom, as "sqt_" and 64 hex digits) and the tokens-file
// line that admits it. Throws std::invalid_argument if `name` is not a valid token name.
struct NewToken {
  std::string token;  // Give it to the client; it is not stored anywhere.
  std::string line;   // "NAME sha256:HEX", for the tokens file.
};
NewToken generate_token(std::string_view name);

// Whether `name` may name a token: 1 to 64 of letters, digits, '.', '_' and '-'.
bool is_token_name(std::string_view name) noexcept;

// Parses a tokens file: blank lines and lines starting with '#' are skipped; every other line is
// "NAME sha256:HEX" optionally followed by " from=ADDRESS,@DOMAIN,...". Names and hashes must be
// unique. Throws std::runtime_error "SOURCE:LINE: what is wrong" (never quoting a hash).
std::vector<Token> parse_tokens(std::string_view text, const std::string& source);
// The same from a file; also throws when it cannot be read.
std::vector<Token> load_tokens_file(const std::string& path);

// The tokens in force, looked up by the token a client presents.
class TokenSet {
 public:
  TokenSet() = default;
  explicit TokenSet(std::vector<Token> tokens) : tokens_(std::move(tokens)) {}

  // The entry whose hash is SHA-256(presented), or nullptr. Every entry is compared, in
  // constant time, whatever matches.
  const Token* find(std::string_view presented) const noexcept;
  bool empty() const noexcept { return tokens_.empty(); }
  std::size_t size() const noexcept { return tokens_.size(); }

 private:
  std::vector<Token> tokens_;  // From the tokens file.
};

// The credential of an "Authorization: Bearer TOKEN" header value (scheme case-insensitive), or
// nullopt for another scheme or an empty token.
std::optional<std::string_view> bearer_token(std::string_view authorization) noexcept;

// Whether a numeric address ("127.0.0.1", "::1", "::ffff:127.0.0.1") is a loopback address.
bool is_loopback_address(std::string_view numeric_host) noexcept;

}  // namespace squall::auth

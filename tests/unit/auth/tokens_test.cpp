#include "squall/auth/tokens.hpp"
#include "test_support.hpp"

#include <doctest/doctest.h>

#include <fstream>
#include <set>
#include <stdexcept>
#include <string>

using namespace squall::auth;

namespace {

std::string parse_error(std::string_view text) {
  try {
    parse_tokens(text, "tokens");
  } catch (const std::exception& error) {
    return error.what();
  }
  return "";
}

}  // namespace

TEST_CASE("sha256 matches the standard test vectors") {
  CHECK(to_hex(sha256("")) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(to_hex(sha256("abc")) ==
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST_CASE("a new token is random, 256 bits, and its line admits exactly it") {
  const NewToken first = generate_token("ci-runner");
  const NewToken second = generate_token("ci-runner");
  CHECK(first.token != second.token);
  CHECK(first.token.size() == 4 + 64);
  CHECK(first.token.rfind("sqt_", 0) == 0);
  CHECK(first.line == "ci-runner sha256:" + to_hex(sha256(first.token)));
  // The line holds no part of the token.
  CHECK(first.line.find(first.token.substr(4)) == std::string::npos);

  const TokenSet tokens(parse_tokens(first.line + "\n", "tokens"));
  const Token* found = tokens.find(first.token);
  REQUIRE(found != nullptr);
  CHECK(found->name == "ci-runner");
  CHECK(found->senders.empty());
  CHECK(tokens.find(second.token) == nullptr);
  CHECK(tokens.find("") == nullptr);
  CHECK(tokens.find(first.token + "x") == nullptr);
  CHECK(tokens.find(std::string(5000, 'a')) == nullptr);
  CHECK_THROWS_AS(generate_token("bad name"), std::invalid_argument);
  CHECK_THROWS_AS(generate_token(""), std::invalid_argument);
}

TEST_CASE("tokens files: comments, from= lists, and errors naming the line") {
  const std::string hash_a = "sha256:" + to_hex(sha256("a"));
  const std::string hash_b = "sha256:" + to_hex(sha256("b"));
  const auto tokens =
      parse_tokens("# a comment\n\n  alice " + hash_a +
                       " from=Alice@Example.com,@example.org\r\nbob\t" + hash_b + "\n",
                   "tokens");
  REQUIRE(tokens.size() == 2);
  CHECK(tokens[0].name == "alice");
  CHECK(tokens[0].senders == std::vector<std::string>{"alice@example.com", "@example.org"});
  CHECK(tokens[1].name == "bob");

  CHECK(parse_error("alice\n") ==
        "tokens:1: expected \"NAME sha256:HEX\" optionally followed by "
        "\"from=ADDRESS,@DOMAIN\"");
  CHECK(parse_error("\nalice sha256:abcd\n").rfind("tokens:2: token alice: expected its hash", 0) ==
        0);
  CHECK(parse_error("alice sha256:" + std::string(64, 'g') + "\n") ==
        "tokens:1: token alice: the hash is not hexadecimal");
  CHECK(parse_error("al/ice " + hash_a + "\n").rfind("tokens:1: token name \"al/ice\"", 0) == 0);
  CHECK(parse_error("alice " + hash_a + "\nalice " + hash_b + "\n") ==
        "tokens:2: token name alice is listed twice");
  CHECK(parse_error("alice " + hash_a + "\nbob " + hash_a + "\n") ==
        "tokens:2: token bob has the same hash as token alice");
  CHECK(parse_error("alice " + hash_a + " from=nobody\n") ==
        "tokens:1: token alice: from= entry \"nobody\" is neither an address (a@example.com) nor "
        "a domain (@example.com)");
  CHECK(parse_error("alice " + hash_a + " to=x@y\n") ==
        "tokens:1: token alice: expected from=ADDRESS,@DOMAIN,... after the hash");

  squall::testing::TempDir dir;
  CHECK_THROWS_WITH_AS(
      load_tokens_file(dir.file("missing")),
      (dir.file("missing") + ": cannot read the tokens file: No such file or directory").c_str(),
      std::runtime_error);
  std::ofstream(dir.file("tokens")) << "carol " << hash_a << "\n";
  CHECK(load_tokens_file(dir.file("tokens")).at(0).name == "carol");
}

TEST_CASE("bearer credentials and loopback addresses") {
  CHECK(bearer_token("Bearer abc") == std::string_view("abc"));
  CHECK(bearer_token("bearer   abc  ") == std::string_view("abc"));
  CHECK_FALSE(bearer_token("Basic abc"));
  CHECK_FALSE(bearer_token("Bearer"));
  CHECK_FALSE(bearer_token("Bearer "));
  CHECK_FALSE(bearer_token("Bearerabc"));

  CHECK(is_loopback_address("127.0.0.1"));
  CHECK(is_loopback_address("127.3.2.1"));
  CHECK(is_loopback_address("::1"));
  CHECK(is_loopback_address("::ffff:127.0.0.1"));
  CHECK_FALSE(is_loopback_address("0.0.0.0"));
  CHECK_FALSE(is_loopback_address("::"));
  CHECK_FALSE(is_loopback_address("192.0.2.1"));
  CHECK_FALSE(is_loopback_address("::ffff:192.0.2.1"));
  CHECK_FALSE(is_loopback_address(""));
  CHECK_FALSE(is_loopback_address("localhost"));
}

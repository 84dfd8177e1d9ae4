#include "squall/mail/email.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "mail/email_dom.hpp"

using namespace squall::mail;
using namespace std::chrono;

namespace {

const EmailLimits kLimits{};

Email parse_ok(std::string_view body, const EmailLimits& limits = kLimits) {
  auto result = parse_email_request(body, limits);
  if (auto* error = std::get_if<FieldError>(&result)) {
    FAIL("unexpected error: " << error->field << " " << error->message);
  }
  return std::get<Email>(result);
}

FieldError parse_error(std::string_view body, const EmailLimits& limits = kLimits) {
  auto result = parse_email_request(body, limits);
  REQUIRE_MESSAGE(std::holds_alternative<FieldError>(result), "accepted: " << body);
  return std::get<FieldError>(result);
}

// The field a body is rejected for, and a part of the message.
void check_rejected(std::string_view body, std::string_view field, std::string_view message_part,
                    const EmailLimits& limits = kLimits) {
  CAPTURE(body);
  const FieldError error = parse_error(body, limits);
  CHECK(error.field == field);
  CHECK_MESSAGE(error.message.find(message_part) != std::string::npos, error.message);
}

std::string address_error(std::string_view text) {
  auto parsed = parse_address(text);
  REQUIRE_MESSAGE(std::holds_alternative<std::string>(parsed), "accepted: " << text);
  return std::get<std::string>(parsed);
}

Address address_ok(std::string_view text) {
  auto parsed = parse_address(text);
  if (auto* reason = std::get_if<std::string>(&parsed)) FAIL(text << ": " << *reason);
  return std::get<Address>(parsed);
}

std::string base64_decode(std::string_view in) {
  static constexpr std::string_view kAlphabet =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  std::uint32_t buffer = 0;
  int bits = 0;
  for (const char c : in) {
    if (c == '=') break;
    const auto value = kAlphabet.find(c);
    REQUIRE(value != std::string_view::npos);
    buffer = (buffer << 6) | static_cast<std::uint32_t>(value);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((buffer >> bits) & 0xff);
    }
  }
  return out;
}

std::string qp_decode(std::string_view in) {
  std::string out;
  for (std::size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '=') {
      out += in[i];
    } else if (in.substr(i + 1, 2) == "\r\n") {
      i += 2;  // soft line break
    } else {
      out += static_cast<char>(std::stoi(std::string(in.substr(i + 1, 2)), nullptr, 16));
      i += 2;
    }
  }
  return out;
}

std::vector<std::string> split_lines(std::string_view text) {
  std::vector<std::string> lines;
  std::size_t start = 0;
  while (start <= text.size()) {
    const auto end = text.find("\r\n", start);
    if (end == std::string_view::npos) {
      if (start < text.size()) lines.emplace_back(text.substr(start));
      break;
    }
    lines.emplace_back(text.substr(start, end - start));
    start = end + 2;
  }
  return lines;
}

std::string headers_of(std::string_view mime) {
  return std::string(mime.substr(0, mime.find("\r\n\r\n") + 2));
}

// One header, unfolded (CRLF before a continuation removed), without its name.
std::string header_value(std::string_view mime, std::string_view name) {
  const std::string headers = headers_of(mime);
  const std::string prefix = "\r\n" + std::string(name) + ": ";
  auto start = ("\r\n" + headers).find(prefix);
  REQUIRE_MESSAGE(start != std::string::npos, name << " missing in\n" << headers);
  start += prefix.size() - 2;
  std::string value;
  std::size_t i = start;
  while (true) {
    const auto end = headers.find("\r\n", i);
    value += headers.substr(i, end - i);
    if (end + 2 < headers.size() && (headers[end + 2] == ' ' || headers[end + 2] == '\t')) {
      i = end + 2;
      continue;
    }
    break;
  }
  return value;
}

// Decodes a value made only of =?UTF-8?B?...?= words separated by whitespace.
std::string decode_encoded_words(std::string_view value) {
  std::string out;
  std::size_t i = 0;
  while (i < value.size()) {
    if (value[i] == ' ') {
      ++i;
      continue;
    }
    REQUIRE(value.substr(i, 10) == "=?UTF-8?B?");
    const auto end = value.find("?=", i + 10);
    REQUIRE(end != std::string_view::npos);
    CHECK(end + 2 - i <= 75);  // RFC 2047: an encoded-word is at most 75 characters
    const std::string chunk = base64_decode(value.substr(i + 10, end - i - 10));
    // Each word holds whole characters: it neither starts nor ends inside one.
    REQUIRE(!chunk.empty());
    CHECK((static_cast<unsigned char>(chunk.front()) & 0xc0) != 0x80);
    std::size_t pos = 0;
    while (pos < chunk.size()) {
      const auto lead = static_cast<unsigned char>(chunk[pos]);
      pos += lead < 0x80 ? 1 : lead < 0xe0 ? 2 : lead < 0xf0 ? 3 : 4;
    }
    CHECK(pos == chunk.size());
    out += chunk;
    i = end + 2;
  }
  return out;
}

void check_line_lengths(std::string_view mime, std::size_t header_max, std::size_t body_max) {
  const auto blank = mime.find("\r\n\r\n");
  for (const auto& line : split_lines(mime.substr(0, blank))) {
    CHECK_MESSAGE(line.size() <= header_max, line);
  }
  for (const auto& line : split_lines(mime.substr(blank + 4))) {
    CHECK_MESSAGE(line.size() <= body_max, line);
  }
}

const system_clock::time_point kDate = sys_days{year{2026} / November / 21} + 14h + 3min + 32s;

}  // namespace

// ---------------------------------------------------------------------------------------------
// Addresses

TEST_CASE("parse_address accepts the practical subset of RFC 5322") {
  CHECK(address_ok("a@b.c").addr_spec == "a@b.c");
  CHECK(address_ok("a@b.c").display_name.empty());
  CHECK(address_ok("first.last+tag@mail.example.com").addr_spec ==
        "first.last+tag@mail.example.com");
  CHECK(address_ok("squall@localhost").addr_spec == "squall@localhost");
  CHECK(address_ok("o'brien!#$%&*/=?^_`{|}~-@x-y.example").addr_spec ==
        "o'brien!#$%&*/=?^_`{|}~-@x-y.example");
  CHECK(address_ok("\"john..doe\"@example.com").addr_spec == "\"john..doe\"@example.com");
  CHECK(address_ok("\"a\\\"b\"@example.com").addr_spec == "\"a\\\"b\"@example.com");
  CHECK(address_ok("a@[192.0.2.1]").addr_spec == "a@[192.0.2.1]");
  CHECK(address_ok("a@[IPv6:2001:db8::1]").addr_spec == "a@[IPv6:2001:db8::1]");

  Address named = address_ok("Alice Example <alice@example.com>");
  CHECK(named.display_name == "Alice Example");
  CHECK(named.addr_spec == "alice@example.com");
  CHECK(address_ok("<alice@example.com>").display_name.empty());
  CHECK(address_ok("Alice<alice@example.com>").display_name == "Alice");
  CHECK(address_ok("\"Doe, John \\\"JD\\\"\" <j@example.com>").display_name == "Doe, John \"JD\"");
  CHECK(address_ok("Jörg Müller ✓ <j@example.de>").display_name == "Jörg Müller ✓");

  const std::string longest = std::string(64, 'l') + "@" + std::string(63, 'd') + "." +
                              std::string(63, 'd') + "." + std::string(61, 'd');
  REQUIRE(longest.size() == 254);
  CHECK(address_ok(longest).addr_spec == longest);
}

TEST_CASE("parse_address says what is wrong") {
  CHECK(address_error("") == "is empty");
  CHECK(address_error("plain") == "has no @");
  CHECK(address_error("@example.com") == "has an empty local part");
  CHECK(address_error("a@") == "has no domain after the @");
  CHECK(address_error("a..b@example.com").find("double dot") != std::string::npos);
  CHECK(address_error(".a@example.com").find("leading") != std::string::npos);
  CHECK(address_error("a(b)@example.com").find("'('") != std::string::npos);
  CHECK(address_error("jörg@example.de").find("non-ASCII") != std::string::npos);
  CHECK(address_error("a@b..c").find("empty label") != std::string::npos);
  CHECK(address_error("a@example.com.").find("empty label") != std::string::npos);
  CHECK(address_error("a@-x.com").find("hyphen") != std::string::npos);
  CHECK(address_error("a@x_y.com").find("'x_y'") != std::string::npos);
  CHECK(address_error("a@bü.de").find("xn--") != std::string::npos);
  CHECK(address_error("a@1.2.3.4").find("[192.0.2.1]") != std::string::npos);
  CHECK(address_error("a@[1.2.3]").find("literal") != std::string::npos);
  CHECK(address_error("a@[1.2.3.4").find("not closed") != std::string::npos);
  CHECK(address_error("a@" + std::string(64, 'd') + ".com").find("63") != std::string::npos);
  CHECK(address_error(std::string(65, 'l') + "@example.com").find("64") != std::string::npos);
  CHECK(address_error(std::string(64, 'l') + "@" + std::string(63, 'd') + "." +
                      std::string(63, 'd') + "." + std::string(62, 'd'))
            .find("254") != std::string::npos);
  // Whitespace only in a display name.
  CHECK(address_error("a @example.com").find("whitespace") != std::string::npos);
  CHECK(address_error("a@example.com ").find("whitespace") != std::string::npos);
  CHECK(address_error(" Alice <a@example.com>").find("whitespace") != std::string::npos);
  CHECK(address_error("Alice <a @example.com>").find("whitespace") != std::string::npos);
  CHECK(address_error("Alice <a@example.com").find("without a >") != std::string::npos);
  CHECK(address_error("Alice a@example.com>").find("without a <") != std::string::npos);
  CHECK(address_error("Al\"ice <a@example.com>").find("quoted") != std::string::npos);
  CHECK(address_error("\"Alice <a@example.com>").find("not closed") != std::string::npos);
  CHECK(address_error("\"Alice\" x <a@example.com>").find("between") != std::string::npos);
  CHECK(address_error("A <b> <a@example.com>").find("more than one") != std::string::npos);
  // Control characters and broken UTF-8.
  CHECK(address_error("Evil\r <a@example.com>") == "contains CR, LF or NUL");
  CHECK(address_error(std::string("a@exa\0mple.com", 14)) == "contains CR, LF or NUL");
  CHECK(address_error("Bell\x07 <a@example.com>") == "contains a control character");
  CHECK(address_error("\xff <a@example.com>") == "is not valid UTF-8");
}

// ---------------------------------------------------------------------------------------------
// Requests

TEST_CASE("valid requests: to as a string or a list") {
  Email one = parse_ok(R"({"to": "a@example.com", "subject": "Hi", "text": "Hello"})");
  CHECK(one.to == std::vector<std::string>{"a@example.com"});
  CHECK(one.subject == "Hi");
  CHECK(one.text == "Hello");
  CHECK(one.from.empty());
  CHECK(one.cc.empty());
  CHECK(one.html.empty());

  Email many = parse_ok(R"({
    "to": ["a@example.com", "Bob <b@example.com>"],
    "cc": "c@example.com", "bcc": ["d@example.com", "e@example.com"],
    "from": "Sender <s@example.com>", "reply_to": "r@example.com",
    "subject": "Grüße ✓", "text": "plain", "html": "<p>html</p>"})");
  CHECK(many.to == std::vector<std::string>{"a@example.com", "Bob <b@example.com>"});
  CHECK(many.cc == std::vector<std::string>{"c@example.com"});
  CHECK(many.bcc == std::vector<std::string>{"d@example.com", "e@example.com"});
  CHECK(many.from == "Sender <s@example.com>");
  CHECK(many.reply_to == "r@example.com");
  CHECK(many.subject == "Grüße ✓");
  CHECK(many.html == "<p>html</p>");

  // html alone, an empty subject, null for optional fields, empty cc and bcc lists.
  Email html = parse_ok(R"({"to": ["a@example.com"], "subject": "", "html": "<b>x</b>",
                            "text": null, "cc": [], "bcc": null, "from": null})");
  CHECK(html.subject.empty());
  CHECK(html.text.empty());
  CHECK(html.html == "<b>x</b>");
  CHECK(html.cc.empty());
}

TEST_CASE("rejected: the body itself") {
  check_rejected(R"({"to": "a@example.com",)", "body", "is not valid JSON: parse error at line 1");
  check_rejected("{\"to\": x}", "body", "column 8");
  check_rejected("", "body", "is not valid JSON");
  check_rejected(R"(["a@example.com"])", "body", "must be a JSON object");
  check_rejected(R"("a@example.com")", "body", "must be a JSON object");
  // A key that is not UTF-8 cannot name a field.
  check_rejected("{\"t\xffo\": \"a@example.com\"}", "body", "");
}

TEST_CASE("rejected: unknown, duplicate and missing fields") {
  check_rejected(R"({"to": "a@example.com", "subject": "s", "text": "t", "Bcc": "x@y.z"})", "Bcc",
                 "is not a known field");
  check_rejected(R"({"to": "a@example.com", "subject": "s", "text": "t", "attachments": []})",
                 "attachments", "is not a known field");
  // An empty name (found by the email fuzz target): the error still names a field.
  check_rejected(R"({"": "x", "to": "a@example.com", "subject": "s", "text": "t"})", "body",
                 "has a field with an empty name");
  check_rejected(R"({"": "x", "": "y", "to": "a@example.com", "subject": "s", "text": "t"})",
                 "body", "has a field with an empty name");
  check_rejected(R"({"to": "a@example.com", "to": "b@example.com", "subject": "s", "text": "t"})",
                 "to", "appears more than once");
  check_rejected(R"({"subject": "s", "text": "t"})", "to", "is required");
  check_rejected(R"({"to": "a@example.com", "text": "t"})", "subject", "is required");
  check_rejected(R"({"to": "a@example.com", "subject": "s"})", "text", "text or html");
  check_rejected(R"({"to": "a@example.com", "subject": "s", "text": "", "html": ""})", "text",
                 "text or html");
}

TEST_CASE("rejected: wrong types") {
  check_rejected(R"({"to": 5, "subject": "s", "text": "t"})", "to",
                 "must be a string or an array of strings");
  check_rejected(R"({"to": [], "subject": "s", "text": "t"})", "to", "must not be an empty array");
  check_rejected(R"({"to": ["a@example.com", 3], "subject": "s", "text": "t"})", "to[1]",
                 "must be a string");
  check_rejected(R"({"to": "a@example.com", "cc": {}, "subject": "s", "text": "t"})", "cc",
                 "must be a string or an array");
  check_rejected(R"({"to": "a@example.com", "bcc": [null], "subject": "s", "text": "t"})", "bcc[0]",
                 "must be a string");
  check_rejected(R"({"to": "a@example.com", "subject": 1, "text": "t"})", "subject",
                 "must be a string");
  check_rejected(R"({"to": "a@example.com", "subject": "s", "text": ["t"]})", "text",
                 "must be a string");
  check_rejected(R"({"to": "a@example.com", "subject": "s", "html": true})", "html",
                 "must be a string");
  check_rejected(R"({"to": "a@example.com", "from": 5, "subject": "s", "text": "t"})", "from",
                 "must be a string");
  check_rejected(R"({"to": "a@example.com", "reply_to": ["r@example.com"], "subject": "s",
                     "text": "t"})",
                 "reply_to", "must be a string");
}

TEST_CASE("rejected: malformed addresses, named by field and index") {
  check_rejected(
      R"({"to": ["a@example.com", "b@example.com", "not-an-address"], "subject": "s", "text": "t"})",
      "to[2]", "is not a valid address: has no @");
  check_rejected(R"({"to": "a@@example.com", "subject": "s", "text": "t"})", "to",
                 "is not a valid address");
  check_rejected(
      R"({"to": "a@example.com", "cc": ["c@example..com"], "subject": "s", "text": "t"})", "cc[0]",
      "empty label");
  check_rejected(
      R"({"to": "a@example.com", "bcc": "b c@example.com", "subject": "s", "text": "t"})", "bcc",
      "whitespace");
  check_rejected(R"({"to": "a@example.com", "from": "", "subject": "s", "text": "t"})", "from",
                 "is empty");
  check_rejected(R"({"to": "a@example.com", "reply_to": "r@", "subject": "s", "text": "t"})",
                 "reply_to", "has no domain");
}

TEST_CASE("rejected: header injection through CR, LF or NUL") {
  check_rejected(R"({"to": "a@b.c\r\nBcc: x@y.z", "subject": "s", "text": "t"})", "to",
                 "header injection");
  check_rejected(R"({"to": ["ok@b.c", "a@b.c\nBcc: x@y.z"], "subject": "s", "text": "t"})", "to[1]",
                 "header injection");
  check_rejected(R"({"to": "a@b.c", "cc": "c@d.e\r\n", "subject": "s", "text": "t"})", "cc",
                 "header injection");
  check_rejected(R"({"to": "a@b.c", "bcc": ["x@y.z\u0000"], "subject": "s", "text": "t"})",
                 "bcc[0]", "header injection");
  check_rejected(R"({"to": "a@b.c", "subject": "Hi\nBcc: x@y.z", "text": "t"})", "subject",
                 "header injection");
  check_rejected(R"({"to": "a@b.c", "subject": "Hi\r", "text": "t"})", "subject",
                 "header injection");
  check_rejected(R"({"to": "a@b.c", "from": "Evil\r <e@b.c>", "subject": "s", "text": "t"})",
                 "from", "header injection");
  check_rejected(R"({"to": "a@b.c", "reply_to": "Evil\n\tBcc: x@y.z <e@b.c>", "subject": "s",
                     "text": "t"})",
                 "reply_to", "header injection");
  check_rejected(R"({"to": "Mallory\u0000 <a@b.c>", "subject": "s", "text": "t"})", "to",
                 "header injection");
  check_rejected(R"({"to": "a@b.c", "subject": "bell\u0007", "text": "t"})", "subject",
                 "control character");
  // Line breaks in the body are just text.
  CHECK(parse_ok(R"({"to": "a@b.c", "subject": "s\tt", "text": "a\r\nb\nBcc: x@y.z"})").text ==
        "a\r\nb\nBcc: x@y.z");
}

TEST_CASE("rejected: too many recipients, counted over to + cc + bcc") {
  const EmailLimits limits{3, 1 << 20};
  parse_ok(R"({"to": ["a@b.c", "b@b.c"], "bcc": "c@b.c", "subject": "s", "text": "t"})", limits);
  check_rejected(
      R"({"to": ["a@b.c", "b@b.c"], "cc": "c@b.c", "bcc": ["d@b.c"], "subject": "s", "text": "t"})",
      "bcc[0]", "at most 3 recipients", limits);
  check_rejected(R"({"to": ["a@b.c", "a@b.c", "a@b.c", "a@b.c"], "subject": "s", "text": "t"})",
                 "to[3]", "is recipient number 4", limits);
}

TEST_CASE("rejected: subject + text + html over max_email_bytes") {
  const EmailLimits limits{50, 10};
  parse_ok(R"({"to": "a@b.c", "subject": "12345", "text": "12345"})", limits);
  check_rejected(R"({"to": "a@b.c", "subject": "12345", "text": "123456"})", "text",
                 "are 11 bytes, at most 10", limits);
  check_rejected(R"({"to": "a@b.c", "subject": "1", "text": "1", "html": "123456789"})", "html",
                 "too large", limits);
  check_rejected(R"({"to": "a@b.c", "subject": "12345678901", "text": "t"})", "subject",
                 "too large", limits);
}

TEST_CASE("rejected: strings that are not UTF-8, named by field") {
  check_rejected("{\"to\": \"a@b.c\", \"subject\": \"bad \xff byte\", \"text\": \"t\"}", "subject",
                 "is not valid UTF-8");
  check_rejected("{\"to\": \"a@b.c\", \"subject\": \"s\", \"text\": \"\xc3\x28\"}", "text",
                 "is not valid UTF-8");
  check_rejected("{\"to\": \"a@b.c\", \"subject\": \"s\", \"html\": \"\xed\xa0\x80\"}", "html",
                 "is not valid UTF-8");
  check_rejected(R"({"to": "a@b.c", "subject": "s", "text": "lone \ud800 surrogate"})", "text",
                 "is not valid UTF-8");
  check_rejected("{\"to\": [\"a@b.c\", \"J\xf6rg <j@b.c>\"], \"subject\": \"s\", \"text\": \"t\"}",
                 "to[1]", "is not valid UTF-8");
}

// ---------------------------------------------------------------------------------------------
// Stored form

TEST_CASE("email_to_json and email_from_json round-trip exactly") {
  Email email;
  email.from = "\"Doe, John\" <j@example.com>";
  email.to = {"a@example.com", "Jörg <j@example.de>"};
  email.cc = {"c@example.com"};
  email.bcc = {"hidden@example.com"};
  email.reply_to = "r@example.com";
  email.subject = "Grüße ✓ \"quoted\" \\ back";
  email.text = std::string("line 1\r\nline 2\n\ttab \0 nul", 26);
  email.html = "<p>✓</p>";
  const std::string json = email_to_json(email);
  CHECK(email_from_json(json) == email);
  CHECK(email_from_json(email_to_json(Email{})) == Email{});
  CHECK(json.starts_with(R"({"from":)"));

  CHECK_THROWS_AS(email_from_json("not json"), std::invalid_argument);
  CHECK_THROWS_AS(email_from_json("[]"), std::invalid_argument);
  CHECK_THROWS_AS(email_from_json(R"({"to": "a@b.c"})"), std::invalid_argument);
  CHECK_THROWS_AS(email_from_json(R"({"subject": 1})"), std::invalid_argument);
  CHECK_THROWS_AS(email_from_json(R"({"to": [1]})"), std::invalid_argument);
  CHECK_THROWS_AS(email_from_json(R"({"attachments": []})"), std::invalid_argument);
  Email partial = email_from_json(R"({"to": ["a@b.c"], "subject": "s"})");
  CHECK(partial.to == std::vector<std::string>{"a@b.c"});
  CHECK(partial.text.empty());

  Email bad;
  bad.subject = "\xff";
  CHECK_THROWS_AS(email_to_json(bad), std::invalid_argument);
}

TEST_CASE("email_from_json reads the stored form without a DOM, and answers as the DOM path") {
  Email full;
  full.from = "\"Doe, John\" <j@example.com>";
  full.to = {"a@example.com", "Jörg <j@example.de>"};
  full.cc = {"c@example.com"};
  full.bcc = {"hidden@example.com", "h2@example.com"};
  full.reply_to = "r@example.com";
  full.subject = "Grüße ✓ \"quoted\" \\ back";
  full.text = std::string("line 1\r\nline 2\n\ttab \0 nul \x1f \b\f", 30);
  full.html = "<p>✓</p>";
  Email small;
  small.to = {"a@b.c"};
  small.text = "t";
  // What the stored form of each is: read directly, and the same as the DOM reads it.
  for (const Email& email : {full, small, Email{}}) {
    const std::string stored = email_to_json(email);
    CHECK(detail::reads_stored_form_directly(stored));
    CHECK(email_from_json(stored) == email);
    CHECK(detail::email_from_json_dom(stored) == email);
  }
  // Anything else, however close, gives what the DOM gives: the same email or an exception.
  const auto same_as_dom = [](std::string_view json) {
    std::optional<Email> direct, dom;
    try {
      direct = email_from_json(json);
    } catch (const std::invalid_argument&) {
    }
    try {
      dom = detail::email_from_json_dom(json);
    } catch (const std::invalid_argument&) {
    }
    CHECK_MESSAGE(direct == dom, json);
    return dom.has_value();
  };
  constexpr std::string_view kReplacements[] = {"\"", "\\", "{", "}", "[", "]",    ",",   ":",
                                                " ",  "u",  "0", "1", "f", "\x00", "\xff"};
  const std::string stored = email_to_json(full);
  std::size_t valid = 0;
  for (std::size_t i = 0; i < stored.size(); ++i) {
    valid += same_as_dom(std::string_view(stored).substr(0, i));
    std::string mutated = stored;
    mutated.erase(i, 1);
    valid += same_as_dom(mutated);
    for (const std::string_view replacement : kReplacements) {
      mutated = stored;
      mutated.replace(i, 1, replacement.empty() ? std::string_view("\0", 1) : replacement);
      valid += same_as_dom(mutated);
    }
  }
  CHECK(valid > 100);  // Mutations that stay valid JSON are compared too.
  // Other spellings of the same email are read by the DOM path.
  CHECK(!detail::reads_stored_form_directly(R"({"to": ["a@b.c"], "subject": "s"})"));
  CHECK(email_from_json(R"({"to":["a@b.c"],"text":"\u00e9"})").text == "é");
}

// ---------------------------------------------------------------------------------------------
// MIME

TEST_CASE("build_mime: exact headers and body of an ASCII text message") {
  Email email;
  email.to = {"Alice <alice@example.com>", "bob@example.org"};
  email.cc = {"carol@example.net"};
  email.bcc = {"secret@example.com"};
  email.reply_to = "Support Team <help@example.com>";
  email.subject = "Hello there";
  email.text = "Hi Alice,\n.\n.hidden line\nA = B, price 5 € \nBye";
  const std::string mime =
      build_mime(email, "Squall <squall@example.com>", "job-1@example.com", kDate);
  CHECK(mime ==
        "Date: Sat, 21 Nov 2026 14:03:32 +0000\r\n"
        "Message-ID: <job-1@example.com>\r\n"
        "From: Squall <squall@example.com>\r\n"
        "To: Alice <alice@example.com>, bob@example.org\r\n"
        "Cc: carol@example.net\r\n"
        "Reply-To: Support Team <help@example.com>\r\n"
        "Subject: Hello there\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n"
        "\r\n"
        "Hi Alice,\r\n"
        ".\r\n"  // left for libcurl to dot-stuff
        ".hidden line\r\n"
        "A =3D B, price 5 =E2=82=AC=20\r\n"
        "Bye=\r\n");
  CHECK(mime.find("Bcc") == std::string::npos);
  CHECK(mime.find("secret@example.com") == std::string::npos);

  // email.from wins over the default; a text that ends with a line break keeps it.
  email.from = "me@example.com";
  email.text = "one line\n";
  email.cc.clear();
  email.reply_to.clear();
  const std::string second = build_mime(email, "squall@example.com", "<x@y>", kDate);
  CHECK(header_value(second, "From") == "me@example.com");
  CHECK(header_value(second, "Message-ID") == "<x@y>");
  CHECK(second.find("Cc:") == std::string::npos);
  CHECK(second.find("Reply-To:") == std::string::npos);
  CHECK(second.ends_with("\r\n\r\none line\r\n"));
}

TEST_CASE("build_mime: a non-ASCII subject is RFC 2047 encoded and decodes back") {
  Email email;
  email.to = {"a@example.com"};
  email.subject = "Grüße ✓";
  email.text = "t";
  const std::string mime = build_mime(email, "s@example.com", "id@example.com", kDate);
  const std::string subject = header_value(mime, "Subject");
  CHECK(subject.starts_with("=?UTF-8?B?"));
  CHECK(decode_encoded_words(subject) == "Grüße ✓");

  // Looks like an encoded-word but is plain text: encoded, so no decoder misreads it.
  email.subject = "=?UTF-8?B?eA==?= literally";
  CHECK(decode_encoded_words(header_value(build_mime(email, "s@example.com", "i@x", kDate),
                                          "Subject")) == email.subject);
  // Leading and trailing spaces survive only inside encoded-words.
  email.subject = " padded ";
  CHECK(decode_encoded_words(header_value(build_mime(email, "s@example.com", "i@x", kDate),
                                          "Subject")) == " padded ");
}

TEST_CASE("build_mime: long subjects are folded") {
  Email email;
  email.to = {"a@example.com"};
  email.text = "t";

  // ASCII words: folded at spaces; unfolding gives the subject back.
  email.subject.clear();
  for (int i = 0; i < 30; ++i) email.subject += "word" + std::to_string(i) + (i % 7 ? " " : "  ");
  email.subject += "end";
  std::string mime = build_mime(email, "s@example.com", "i@x", kDate);
  check_line_lengths(mime, 78, 76);
  CHECK(header_value(mime, "Subject") == email.subject);
  const auto subject_at = mime.find("\r\nSubject: ");
  const auto subject_end = mime.find("\r\nMIME-Version");
  CHECK(std::count(mime.begin() + subject_at + 2, mime.begin() + subject_end, '\n') >= 2);

  // Non-ASCII: several encoded-words of whole characters, each line within 78.
  email.subject.clear();
  for (int i = 0; i < 20; ++i) email.subject += "Grüße ✓ 😀 ";
  mime = build_mime(email, "s@example.com", "i@x", kDate);
  check_line_lengths(mime, 78, 76);
  CHECK(decode_encoded_words(header_value(mime, "Subject")) == email.subject);

  // One long unbreakable ASCII word cannot be folded as is: encoded-words can.
  email.subject = std::string(200, 'x');
  mime = build_mime(email, "s@example.com", "i@x", kDate);
  check_line_lengths(mime, 78, 76);
  CHECK(decode_encoded_words(header_value(mime, "Subject")) == email.subject);
}

TEST_CASE("build_mime: display names are encoded or quoted as needed") {
  Email email;
  email.from = "Jörg Müller <joerg@example.de>";
  email.to = {"\"Doe, John\" <john@example.com>", "Plain Name <p@example.com>",
              "Ünïcödé ✓ <u@example.com>"};
  email.reply_to = "\"Back\\\\slash \\\"Q\\\"\" <r@example.com>";
  email.subject = "s";
  email.text = "t";
  const std::string mime = build_mime(email, "s@example.com", "i@x", kDate);
  check_line_lengths(mime, 78, 76);
  const std::string from = header_value(mime, "From");
  REQUIRE(from.ends_with(" <joerg@example.de>"));
  CHECK(decode_encoded_words(from.substr(0, from.size() - 19)) == "Jörg Müller");
  const std::string to = header_value(mime, "To");
  CHECK(to.starts_with("\"Doe, John\" <john@example.com>, Plain Name <p@example.com>, =?UTF-8?B?"));
  CHECK(to.ends_with(" <u@example.com>"));
  CHECK(header_value(mime, "Reply-To") == "\"Back\\\\slash \\\"Q\\\"\" <r@example.com>");
  CHECK(mime.find("Jörg") == std::string::npos);  // 7-bit headers only
}

TEST_CASE("build_mime: many recipients fold between addresses") {
  Email email;
  for (int i = 0; i < 20; ++i) email.to.push_back("user" + std::to_string(i) + "@example.com");
  email.subject = "s";
  email.text = "t";
  const std::string mime = build_mime(email, "s@example.com", "i@x", kDate);
  check_line_lengths(mime, 78, 76);
  const std::string to = header_value(mime, "To");
  CHECK(to.starts_with("user0@example.com, user1@example.com, "));
  CHECK(to.ends_with(", user19@example.com"));
}

TEST_CASE("build_mime: text and html make multipart/alternative, text first") {
  Email email;
  email.to = {"a@example.com"};
  email.bcc = {"hidden@example.com"};
  email.subject = "s";
  email.text = "Plain ✓\n.\nlast line without break";
  email.html = "<p>" + std::string(200, 'h') + " = ✓</p>\n";
  const std::string mime = build_mime(email, "s@example.com", "i@x", kDate);
  check_line_lengths(mime, 78, 76);
  CHECK(mime.find("hidden@example.com") == std::string::npos);

  const std::string type = header_value(mime, "Content-Type");
  const std::string prefix = "multipart/alternative; boundary=\"";  // unfolded
  REQUIRE(type.starts_with(prefix));
  REQUIRE(type.ends_with("\""));
  const std::string boundary = type.substr(prefix.size(), type.size() - prefix.size() - 1);
  CHECK(boundary.starts_with("=_"));
  CHECK(boundary.size() > 20);
  CHECK(headers_of(mime).find("Content-Transfer-Encoding") == std::string::npos);
  // Each message has a boundary of its own, on this thread and on another.
  const std::string again =
      header_value(build_mime(email, "s@example.com", "i@x", kDate), "Content-Type");
  std::string elsewhere;
  std::thread([&] {
    elsewhere = header_value(build_mime(email, "s@example.com", "i@x", kDate), "Content-Type");
  }).join();
  CHECK(again != type);
  CHECK(elsewhere != type);
  CHECK(elsewhere != again);

  const std::string body = mime.substr(mime.find("\r\n\r\n") + 4);
  const std::string delimiter = "--" + boundary + "\r\n";
  const std::string close = "\r\n--" + boundary + "--\r\n";
  REQUIRE(body.starts_with(delimiter));
  REQUIRE(body.ends_with(close));
  const auto middle = body.find("\r\n" + delimiter);
  REQUIRE(middle != std::string::npos);
  const std::string first = body.substr(delimiter.size(), middle - delimiter.size());
  const std::string second = body.substr(
      middle + 2 + delimiter.size(), body.size() - close.size() - middle - 2 - delimiter.size());
  // The boundary occurs nowhere else.
  CHECK(first.find(boundary) == std::string::npos);
  CHECK(second.find(boundary) == std::string::npos);

  const std::string text_headers =
      "Content-Type: text/plain; charset=utf-8\r\n"
      "Content-Transfer-Encoding: quoted-printable\r\n\r\n";
  const std::string html_headers =
      "Content-Type: text/html; charset=utf-8\r\n"
      "Content-Transfer-Encoding: quoted-printable\r\n\r\n";
  REQUIRE(first.starts_with(text_headers));
  REQUIRE(second.starts_with(html_headers));
  CHECK(qp_decode(first.substr(text_headers.size())) == "Plain ✓\r\n.\r\nlast line without break");
  CHECK(qp_decode(second.substr(html_headers.size())) ==
        "<p>" + std::string(200, 'h') + " = ✓</p>\r\n");
  // Two boundaries of two messages differ.
  CHECK(header_value(build_mime(email, "s@example.com", "i@x", kDate), "Content-Type") != type);
}

TEST_CASE("build_mime: html alone is text/html") {
  Email email;
  email.to = {"a@example.com"};
  email.subject = "s";
  email.html = "<b>bold</b>";
  const std::string mime = build_mime(email, "s@example.com", "i@x", kDate);
  CHECK(header_value(mime, "Content-Type") == "text/html; charset=utf-8");
  CHECK(mime.ends_with("\r\n\r\n<b>bold</b>=\r\n"));
}

TEST_CASE("build_mime: quoted-printable keeps lines within 76 and decodes exactly") {
  Email email;
  email.to = {"a@example.com"};
  email.subject = "s";
  email.text = std::string(300, 'x') + "\n" + std::string(100, '=') + "\r\n" + "trailing space \n" +
               "Grüße ✓ 😀 " + std::string(80, 'y') + "\r" + "tab\t";
  const std::string mime = build_mime(email, "s@example.com", "i@x", kDate);
  check_line_lengths(mime, 78, 76);
  const std::string body = mime.substr(mime.find("\r\n\r\n") + 4);
  for (const char c : body) CHECK(static_cast<unsigned char>(c) < 0x80);
  CHECK(qp_decode(body) == std::string(300, 'x') + "\r\n" + std::string(100, '=') + "\r\n" +
                               "trailing space \r\n" + "Grüße ✓ 😀 " + std::string(80, 'y') +
                               "\r\n" + "tab\t");
  CHECK(body.find("trailing space=20\r\n") != std::string::npos);

  email.text = "From here\nFrom: there";
  const std::string from_line = build_mime(email, "s@example.com", "i@x", kDate);
  CHECK(from_line.ends_with("\r\n\r\n=46rom here\r\nFrom: there=\r\n"));
  CHECK(body.ends_with("tab=09=\r\n"));
}

TEST_CASE("build_mime refuses unusable input") {
  Email email;
  email.to = {"a@example.com"};
  email.subject = "s";
  email.text = "t";
  CHECK_THROWS_AS(build_mime(email, "not an address", "i@x", kDate), std::invalid_argument);
  CHECK_THROWS_AS(build_mime(email, "s@example.com", "i@x\r\nBcc: x@y.z", kDate),
                  std::invalid_argument);
  CHECK_THROWS_AS(build_mime(email, "s@example.com", "", kDate), std::invalid_argument);
  email.to = {"broken"};
  CHECK_THROWS_AS(build_mime(email, "s@example.com", "i@x", kDate), std::invalid_argument);
  email.to = {"a@example.com"};
  email.subject = "a\r\nBcc: x@y.z";
  CHECK_THROWS_AS(build_mime(email, "s@example.com", "i@x", kDate), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Message-ID and envelope

TEST_CASE("make_message_id is stable and takes the domain from the sender") {
  CHECK(make_message_id("job-42", "example.com") == "job-42@example.com");
  CHECK(make_message_id("job-42", "Squall <squall@mail.example.com>") == "job-42@mail.example.com");
  CHECK(make_message_id("job-42", "squall@[192.0.2.1]") == "job-42@[192.0.2.1]");
  CHECK(make_message_id("job-42", "squall@localhost") == "job-42@localhost");
  CHECK(make_message_id("a b.c=d<>", "x.org") == "a=20b=2Ec=3Dd=3C=3E@x.org");
  CHECK(make_message_id("01HF7Y", "x.org") == make_message_id("01HF7Y", "x.org"));
  CHECK_THROWS_AS(make_message_id("", "x.org"), std::invalid_argument);
  CHECK_THROWS_AS(make_message_id("j", ""), std::invalid_argument);
  CHECK_THROWS_AS(make_message_id("j", "bad domain"), std::invalid_argument);
  CHECK_THROWS_AS(make_message_id("j", "broken@"), std::invalid_argument);
}

TEST_CASE("envelope_recipients: bare addresses of to, cc and bcc without duplicates") {
  Email email;
  email.to = {"Alice <alice@example.com>", "bob@example.org"};
  email.cc = {"alice@EXAMPLE.com", "Carol <carol@example.net>"};
  email.bcc = {"hidden@example.com", "Bob Again <bob@example.org>"};
  CHECK(envelope_recipients(email) ==
        std::vector<std::string>{"alice@example.com", "bob@example.org", "carol@example.net",
                                 "hidden@example.com"});
  // Local parts are case-sensitive in SMTP: kept apart.
  email = Email{};
  email.to = {"Alice@example.com", "alice@example.com"};
  CHECK(envelope_recipients(email).size() == 2);
  email.to = {"nope"};
  CHECK_THROWS_AS(envelope_recipients(email), std::invalid_argument);
}

TEST_CASE("envelope_sender: the From address, else the default sender") {
  Email email;
  CHECK(envelope_sender(email, "Squall <squall@example.com>") == "squall@example.com");
  email.from = "Me <me@example.org>";
  CHECK(envelope_sender(email, "Squall <squall@example.com>") == "me@example.org");
  CHECK_THROWS_AS(envelope_sender(Email{}, "bad"), std::invalid_argument);
}

TEST_CASE("rejected: a number out of range is a 400 naming its field, not an exception") {
  check_rejected(R"({"to": "a@example.com", "subject": "s", "text": "t", "x": 1e999})", "x",
                 "number out of range");
  check_rejected(R"({"to": [1e999], "subject": "s", "text": "t"})", "to[0]", "number out of range");
  check_rejected(R"({"to": "a@example.com", "subject": -1e400, "text": "t"})", "subject",
                 "number out of range");
  check_rejected("1e999", "body", "number out of range");
}

TEST_CASE("build_mime: text without a final line break keeps its last line within 76") {
  Email email;
  email.to = {"a@example.com"};
  email.subject = "s";
  // Each length puts the last character at or near column 76, before the final soft break.
  for (std::size_t length = 70; length <= 160; ++length) {
    for (const char last : {'x', '=', ' '}) {
      email.text = std::string(length - 1, 'a') + last;
      CAPTURE(length);
      CAPTURE(last);
      const std::string mime = build_mime(email, "s@example.com", "i@x", kDate);
      check_line_lengths(mime, 78, 76);
      const std::string body = mime.substr(mime.find("\r\n\r\n") + 4);
      CHECK(qp_decode(body) == email.text);
    }
  }
}

TEST_CASE("build_mime: a subject with runs of spaces never folds into a blank line") {
  Email email;
  email.to = {"a@example.com"};
  email.text = "t";
  for (std::size_t spaces = 2; spaces <= 70; spaces += 1) {
    for (std::size_t word = 1; word <= 70; word += 23) {
      email.subject = std::string(word, 'w') + std::string(spaces, ' ') + std::string(word, 'v') +
                      std::string(spaces, ' ') + std::string(60, 'u') + "  end";
      CAPTURE(email.subject);
      const std::string mime = build_mime(email, "s@example.com", "i@x", kDate);
      check_line_lengths(mime, 78, 76);
      for (const std::string& line : split_lines(headers_of(mime))) {
        CHECK(line.find_first_not_of(" \t") != std::string::npos);
      }
      const std::string value = header_value(mime, "Subject");
      CHECK((value == email.subject || decode_encoded_words(value) == email.subject));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// EmailRequestParser: the one-pass scan held against the DOM path

namespace {

// The stored form as earlier versions wrote it: nlohmann::ordered_json's dump().
std::string nlohmann_stored_form(const Email& email) {
  const nlohmann::ordered_json doc = {
      {"from", email.from},
      {"to", email.to},
      {"cc", email.cc},
      {"bcc", email.bcc},
      {"reply_to", email.reply_to},
      {"subject", email.subject},
      {"text", email.text},
      {"html", email.html},
  };
  return doc.dump();
}

Email email_of(const EmailRequestView& r) {
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

// One body through a reused parser and through the DOM path: the same answer, every valid body
// decided by the scan alone, and the stored form the bytes earlier versions stored. Returns
// whether the body was valid.
bool check_same_as_dom(EmailRequestParser& parser, std::string_view body,
                       const EmailLimits& limits = kLimits) {
  CAPTURE(body);
  const auto error = parser.parse(body, limits);
  const auto dom = detail::parse_email_request_dom(body, limits);
  if (const auto* refusal = std::get_if<FieldError>(&dom)) {
    REQUIRE_MESSAGE(error.has_value(), "the scan accepted what the DOM path refuses: "
                                           << refusal->field << " " << refusal->message);
    CHECK(!parser.scanned());
    CHECK(error->field == refusal->field);
    CHECK(error->message == refusal->message);
    return false;
  }
  const Email& expected = std::get<Email>(dom);
  REQUIRE_MESSAGE(!error.has_value(), "refused: " << error->field << " " << error->message);
  CHECK_MESSAGE(parser.scanned(), "a valid body left to the DOM path");
  CHECK(email_of(parser.request()) == expected);
  CHECK(parser.payload() == nlohmann_stored_form(expected));
  CHECK(email_to_json(expected) == parser.payload());
  return true;
}

const std::string_view kValidBodies[] = {
    R"({"to": "a@example.com", "subject": "Hi", "text": "Hello"})",
    R"({"to": "Bench Recipient <rcpt@example.com>", "subject": "squall bench", "text": "Hello from wrk.\n", "html": "<p>Hello from <b>wrk</b>.</p>\n"})",
    R"( {"html":"<b>x</b>","subject":"","to":["a@example.com"],"text":null,"cc":[],"bcc":null,"from":null} )",
    R"({"to": ["a@example.com", "Bob <b@example.com>"], "cc": "c@example.com",
        "bcc": ["d@example.com", "e@example.com"], "from": "Sender <s@example.com>",
        "reply_to": "r@example.com", "subject": "Grüße ✓", "text": "plain", "html": "<p>html</p>"})",
    "\xEF\xBB\xBF{\"to\": \"a@b.c\", \"subject\": \"bom\", \"text\": \"t\"}",
    "{\r\n\t\"to\" :\t[ \"a@b.c\" , \"\\\"q\\\\uote\\\" <x@y.z>\" ] "
    ",\n\"subject\":\"s\",\"text\":\"t\"}",
    R"({"\u0074o": "a@b.c", "sub\u006aect": "escaped keys", "text": "t"})",
    R"({"to": "a@b.c", "subject": "\u00e9\u20ac\ud83d\ude00 \/", "text": "\b"})",
    R"({"to": "a@b.c", "subject": "s", "text": "nul \u0000 bell \u0007 del \u007f \u001F \t\n\r\f\b\"\\\/"})",
    R"({"to": "a@b.c", "subject": "tab\there", "html": "\ud800\udc00 raw ✓ é"})",
    R"({"to": "\"Doe, John\" <j@example.com>", "subject": "s", "text": "t", "reply_to": "\"a..b\"@example.com"})",
    R"({"to": "a@[192.0.2.1]", "cc": ["b@[IPv6:2001:db8::1]"], "subject": "s", "text": "t"})",
    R"({"to": "J\u00f6rg <j@example.de>", "subject": "s", "text": "t"})",
    // nlohmann takes a NUL byte for the end of the input: what follows one is ignored.
    std::string_view("{\"to\": \"a@b.c\", \"subject\": \"s\", \"text\": \"t\"}\0{[", 47),
};

const std::string_view kInvalidBodies[] = {
    "",
    "{}",
    "[]",
    "null",
    R"("a@b.c")",
    R"({"to": "a@b.c", "subject": "s", "text": "t"} x)",
    R"({"to": "a@b.c", "subject": "s", "text": "t",})",
    R"({"to": "a@b.c", "subject": "s", "text": "t", "to": "b@b.c"})",
    R"({"to": "a@b.c", "subject": "s", "text": "t", "": 1})",
    R"({"to": "a@b.c", "subject": "s", "text": "t", "": "x", "": "y"})",
    R"({"to": "a@b.c", "subject": "s", "text": "t", "x": 1e999})",
    R"({"to": [1e999], "subject": "s", "text": "t"})",
    R"({"to": "a@b.c", "subject": 1, "text": "t"})",
    R"({"to": ["a@b.c", ["b@b.c"]], "subject": "s", "text": "t"})",
    R"({"to": {"a": "b"}, "subject": "s", "text": "t"})",
    R"({"to": null, "subject": "s", "text": "t"})",
    R"({"to": [], "subject": "s", "text": "t"})",
    R"({"to": "a@b.c", "subject": null, "text": "t"})",
    R"({"to": "a@b.c", "subject": "s", "text": "", "html": null})",
    R"({"to": "a@b.c", "from": "", "subject": "s", "text": "t"})",
    R"({"to": "a@b.c", "subject": "s\r\n", "text": "t"})",
    R"({"to": "a@b.c", "subject": "s", "text": "lone \ud800 surrogate"})",
    R"({"to": "a@b.c", "subject": "s", "text": "lone \udc00 low"})",
    R"({"to": "a@b.c", "subject": "s", "text": "bad \x escape"})",
    R"({"to": "a@b.c", "subject": "s", "text": "short \u12"})",
    "{\"to\": \"a@b.c\", \"subject\": \"s\", \"text\": \"raw\x01control\"}",
    "{\"to\": \"a@b.c\", \"subject\": \"s\", \"text\": \"\xc3\x28\"}",
    "{\"to\": \"a@b.c\", \"subject\": \"s\", \"text\": \"\xc3\\u00a9\"}",
    "{\"to\": \"a@b.c\", \"subject\": \"s\", \"text\": \"\\u00e9\xa9\"}",
    "\xEF\xBB{\"to\": \"a@b.c\", \"subject\": \"s\", \"text\": \"t\"}",
    R"({"to": "a@b.c", "subject": "s", "text": "t"}{})",
    R"({"to": "a@b.c", "subject": "s", "text": nul})",
    R"({"to": "a@b.c", "subject": "s", "text": "t", "cc": [,]})",
    R"({"to": "a@b.c" "subject": "s", "text": "t"})",
};

}  // namespace

TEST_CASE("EmailRequestParser answers as the DOM path: hand-picked bodies") {
  EmailRequestParser parser;  // Reused throughout, as the server reuses it.
  for (const std::string_view body : kValidBodies) CHECK(check_same_as_dom(parser, body));
  for (const std::string_view body : kInvalidBodies) CHECK(!check_same_as_dom(parser, body));
  // Limits: the recipient count over to + cc + bcc, and subject + text + html in bytes.
  CHECK(check_same_as_dom(parser, R"({"to": ["a@b.c", "b@b.c"], "bcc": "c@b.c", "subject": "s",
                                      "text": "t"})",
                          EmailLimits{3, 100}));
  CHECK(!check_same_as_dom(parser, R"({"to": ["a@b.c", "b@b.c"], "cc": [], "bcc": ["c@b.c",
                                       "d@b.c"], "subject": "s", "text": "t"})",
                           EmailLimits{3, 100}));
  CHECK(check_same_as_dom(parser, R"({"to": "a@b.c", "subject": "12345", "text": "1234\n"})",
                          EmailLimits{3, 10}));
  CHECK(!check_same_as_dom(parser, R"({"to": "a@b.c", "subject": "12345", "text": "12345\n"})",
                           EmailLimits{3, 10}));
}

TEST_CASE("EmailRequestParser answers as the DOM path: every truncation and one-byte change") {
  // Each valid body cut at every length, and with every byte deleted or replaced by one of the
  // bytes that matter to JSON: some of these stay valid, most do not; all must agree.
  constexpr std::string_view kReplacements[] = {"\"", "\\", "{", "}", "[", "]",    ",",    ":",
                                                " ",  "n",  "u", "0", "e", "\x00", "\xff", "\xc3"};
  EmailRequestParser parser;
  std::size_t valid = 0, checked = 0;
  for (const std::string_view body : kValidBodies) {
    for (std::size_t i = 0; i < body.size(); ++i) {
      valid += check_same_as_dom(parser, body.substr(0, i));
      std::string mutated(body);
      mutated.erase(i, 1);
      valid += check_same_as_dom(parser, mutated);
      for (const std::string_view replacement : kReplacements) {
        mutated = body;
        mutated.replace(i, 1, replacement.empty() ? std::string_view("\0", 1) : replacement);
        valid += check_same_as_dom(parser, mutated);
        checked += 3;
      }
    }
  }
  MESSAGE(checked << " bodies, " << valid << " of them valid");
  CHECK(valid > 100);  // The mutations reach valid bodies too, not only refusals.
}

TEST_CASE("EmailRequestParser answers as the DOM path: each JSON special at every offset") {
  // Strings are scanned and written sixteen bytes at a time: an escape, a raw control byte or a
  // UTF-8 sequence (whole, cut or invalid) at every offset of a 40-byte string, in a field read
  // first (to) and in fields written back (subject, text), must read and write back as the DOM
  // path reads them and nlohmann dumps them.
  constexpr std::string_view kSpecials[] = {R"(\")",
                                            R"(\\)",
                                            R"(\/)",
                                            R"(\n)",
                                            R"(\u0001)",
                                            R"(\ud83d\ude00)",
                                            "\xc3\xa9",
                                            "\xe2\x9c\x93",
                                            "\xf0\x9f\x98\x80",
                                            "\x01",
                                            "\x1f",
                                            "\x7f",
                                            "\xc3",
                                            "\xa9",
                                            "\xff",
                                            "\"",
                                            "\\"};
  EmailRequestParser parser;
  std::size_t valid = 0;
  for (const std::string_view special : kSpecials) {
    for (std::size_t offset = 0; offset <= 40; ++offset) {
      std::string text(40, 'a');
      text.insert(offset, special);
      for (const char* field : {"subject", "text"}) {
        const std::string body = std::string(R"({"to": "a@example.com", ")") + field + R"(": ")" +
                                 text + R"(", "html": "<p>)" + text + R"(</p>"})";
        valid += check_same_as_dom(parser, body);
      }
      const std::string to =
          R"({"to": "Name )" + text + R"( <a@example.com>", "subject": "s", "text": "t"})";
      valid += check_same_as_dom(parser, to);
    }
  }
  CHECK(valid > 500);
}

TEST_CASE("EmailRequestParser answers as the DOM path: random requests") {
  // Requests built from random fields in a random order, with strings drawn from pieces that
  // exercise escapes, non-ASCII text and invalid input.
  std::mt19937 random(20261130);
  const auto pick = [&random](auto& choices) -> const auto& {
    return choices[std::uniform_int_distribution<std::size_t>(0, std::size(choices) - 1)(random)];
  };
  constexpr std::string_view kAddresses[] = {R"("a@example.com")",
                                             R"("Bob <b@example.org>")",
                                             R"("\"Q, R\" <q@example.net>")",
                                             R"("x\u0040example.com")",
                                             R"("bad")",
                                             R"("")",
                                             R"("c@[192.0.2.7]")",
                                             "null",
                                             "7",
                                             R"("J\u00f6rg <j@example.de>")",
                                             R"("d@example.com")",
                                             R"("E <e@example.com>")"};
  constexpr std::string_view kTexts[] = {R"("")",
                                         R"("plain")",
                                         R"("line\nbreak\r\n")",
                                         R"("tab\tquote\"slash\/back\\")",
                                         R"("\u00e9\u0000\u001f")",
                                         "\"caf\xc3\xa9 \xe2\x9c\x93\"",
                                         R"("\ud83d\ude00")",
                                         "null",
                                         R"("\ud83d")",
                                         "\"\xff\"",
                                         "true",
                                         R"(["x"])",
                                         R"("bell\u0007")",
                                         R"("more")",
                                         R"("text \u2713")"};
  EmailRequestParser parser;
  std::size_t valid = 0;
  for (int round = 0; round < 3000; ++round) {
    std::vector<std::string> members;
    const auto list = [&](std::size_t max) {
      const std::size_t n = std::uniform_int_distribution<std::size_t>(0, max)(random);
      std::string out = "[";
      for (std::size_t i = 0; i < n; ++i) out += (i ? ", " : "") + std::string(pick(kAddresses));
      return out + "]";
    };
    const auto recipients = [&] {
      return random() % 3 == 0 ? list(3) : std::string(pick(kAddresses));
    };
    if (random() % 20 != 0) members.push_back(R"("to": )" + recipients());
    if (random() % 3 == 0) members.push_back(R"("cc": )" + recipients());
    if (random() % 4 == 0) members.push_back(R"("bcc": )" + recipients());
    if (random() % 4 == 0) members.push_back(R"("from": )" + std::string(pick(kAddresses)));
    if (random() % 5 == 0) members.push_back(R"("reply_to": )" + std::string(pick(kAddresses)));
    if (random() % 20 != 0) members.push_back(R"("subject": )" + std::string(pick(kTexts)));
    if (random() % 3 != 0) members.push_back(R"("text": )" + std::string(pick(kTexts)));
    if (random() % 2 == 0) members.push_back(R"("html": )" + std::string(pick(kTexts)));
    if (random() % 20 == 0) members.push_back(R"("to": "again@example.com")");
    if (random() % 20 == 0) members.push_back(R"("attachments": [])");
    std::shuffle(members.begin(), members.end(), random);
    std::string body = "{";
    for (std::size_t i = 0; i < members.size(); ++i) body += (i ? ",\n " : "") + members[i];
    body += "}";
    valid += check_same_as_dom(parser, body, EmailLimits{4, 40});
  }
  MESSAGE(valid << " of 3000 random requests valid");
  CHECK(valid > 200);
}

TEST_CASE("a job stored by an earlier version reads back, and stores again byte for byte") {
  // A payload exactly as earlier versions wrote it (nlohmann::ordered_json), escapes included.
  const std::string stored =
      R"({"from":"\"Doe, John\" <j@example.com>","to":["a@example.com","Jörg <j@example.de>"],)"
      R"("cc":[],"bcc":["h@example.com"],"reply_to":"","subject":"Grüße \"q\" \\ ✓",)"
      R"("text":"line 1\r\nline 2\n\ttab \u0000 nul \u001f\u007f","html":"<p>\/</p>"})";
  const Email email = email_from_json(stored);
  CHECK(email.from == "\"Doe, John\" <j@example.com>");
  CHECK(email.to == std::vector<std::string>{"a@example.com", "Jörg <j@example.de>"});
  CHECK(email.bcc == std::vector<std::string>{"h@example.com"});
  CHECK(email.subject == "Grüße \"q\" \\ ✓");
  CHECK(email.text == std::string("line 1\r\nline 2\n\ttab \0 nul \x1f\x7f", 28));
  CHECK(email.html == "<p>/</p>");
  // Written again (DEL raw, "\/" as "/"), it is what nlohmann writes.
  CHECK(email_to_json(email) == nlohmann_stored_form(email));
  // And a request with the same content stores the same bytes, so its digest matches.
  EmailRequestParser parser;
  REQUIRE(!parser.parse(
      R"({"from":"\"Doe, John\" <j@example.com>","to":["a@example.com","Jörg <j@example.de>"],)"
      R"("bcc":"h@example.com","subject":"Grüße \"q\" \\ ✓",)"
      R"("text":"line 1\r\nline 2\n\ttab \u0000 nul \u001f)"
      "\x7f"
      R"(","html":"<p>\/</p>"})",
      kLimits));
  CHECK(parser.payload() == email_to_json(email));
}

TEST_CASE("bare_address: the address inside the angle brackets") {
  CHECK(bare_address("a@b.c") == "a@b.c");
  CHECK(bare_address("Name <a@b.c>") == "a@b.c");
  CHECK(bare_address("\"x <y> z\" <q@example.com>") == "q@example.com");
  CHECK(bare_address("") == "");
}

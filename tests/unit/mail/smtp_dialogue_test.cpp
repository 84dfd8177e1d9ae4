// The bytes of SmtpMailer's own mail transaction: replies reassembled from reads cut anywhere,
// and the message dot-stuffed exactly as libcurl 7.88 did it before (bytes checked against what
// libcurl wrote to a relay).
#include "mail/smtp_dialogue.hpp"

#include <doctest/doctest.h>

#include <string>
#include <string_view>
#include <vector>

namespace squall::mail::detail {
namespace {

// Every reply in `bytes`, fed `step` bytes at a time.
std::vector<SmtpReply> replies_of(std::string_view bytes, std::size_t step) {
  SmtpReplyReader reader;
  std::vector<SmtpReply> replies;
  for (std::size_t at = 0; at < bytes.size(); at += step) {
    reader.append(bytes.substr(at, step));
    SmtpReply reply;
    SmtpReplyReader::Status status;
    while ((status = reader.next(reply)) == SmtpReplyReader::Status::reply) {
      replies.push_back(reply);
    }
    REQUIRE(status == SmtpReplyReader::Status::need_more);
  }
  CHECK(reader.empty());
  return replies;
}

TEST_CASE("replies: one-line and multi-line, several in one read or cut at every byte") {
  const std::string_view bytes =
      "250-relay.test\r\n250-PIPELINING\r\n250 SIZE 100\r\n"
      "250 2.1.0 ok\r\n"
      "550-5.1.1 no such\r\n550 5.1.1 user\r\n"
      "354\r\n"
      "221 bye\n";  // a bare LF ends a line too
  for (const std::size_t step : {bytes.size(), std::size_t{1}, std::size_t{2}, std::size_t{7}}) {
    CAPTURE(step);
    const auto replies = replies_of(bytes, step);
    REQUIRE(replies.size() == 5);
    CHECK(replies[0].code == 250);
    CHECK(replies[0].text == "relay.test PIPELINING SIZE 100");
    CHECK(replies[1].text == "2.1.0 ok");
    CHECK(replies[2].code == 550);
    CHECK(replies[2].text == "5.1.1 no such 5.1.1 user");
    CHECK(replies[3].code == 354);
    CHECK(replies[3].text.empty());
    CHECK(replies[4].code == 221);
    CHECK(replies[4].text == "bye");
  }
}

TEST_CASE("replies: an incomplete multi-line reply waits for its last line") {
  SmtpReplyReader reader;
  SmtpReply reply;
  reader.append("250-first\r\n250-second\r\n");
  CHECK(reader.next(reply) == SmtpReplyReader::Status::need_more);
  CHECK(reader.next(reply) == SmtpReplyReader::Status::need_more);  // asking again is harmless
  reader.append("250 third\r\n251 next");
  REQUIRE(reader.next(reply) == SmtpReplyReader::Status::reply);
  CHECK(reply.text == "first second third");
  CHECK_FALSE(reader.empty());  // "251 next" without its line end
  CHECK(reader.next(reply) == SmtpReplyReader::Status::need_more);
}

TEST_CASE("replies: what no SMTP server sends is malformed") {
  for (const std::string_view bytes :
       {"hello\r\n", "25\r\n", "2500 x\r\n", "25x ok\r\n", "250_ok\r\n"}) {
    CAPTURE(bytes);
    SmtpReplyReader reader;
    SmtpReply reply;
    reader.append(bytes);
    CHECK(reader.next(reply) == SmtpReplyReader::Status::malformed);
  }
  SmtpReplyReader endless;
  SmtpReply reply;
  endless.append(std::string(SmtpReplyReader::max_pending + 1, '2'));
  CHECK(endless.next(reply) == SmtpReplyReader::Status::malformed);
}

std::string stuffed(std::string_view message) {
  std::string out = "DATA\r\n";  // what was in the buffer stays
  append_dot_stuffed(out, message);
  return out.substr(6);
}

TEST_CASE("dot-stuffing: as libcurl 7.88 wrote these bodies to a relay") {
  CHECK(stuffed("a\r\n") == "a\r\n.\r\n");
  CHECK(stuffed("") == ".\r\n");
  CHECK(stuffed(".a\r\nb") == "..a\r\nb\r\n.\r\n");           // first byte; no final CRLF
  CHECK(stuffed("x\n.y\r\n") == "x\n.y\r\n.\r\n");            // bare LF: left alone
  CHECK(stuffed("a\r\n.\r\n.") == "a\r\n..\r\n..\r\n.\r\n");  // a lone dot, a last dot
  CHECK(stuffed("a\r\r\n.b\n") == "a\r\r\n..b\n\r\n.\r\n");   // CR before CRLF
  CHECK(stuffed("\r\n..\r\n") == "\r\n...\r\n.\r\n");
  CHECK(stuffed("no dots\r\nat all\r\n") == "no dots\r\nat all\r\n.\r\n");
}

TEST_CASE("EHLO keywords: in any case, with or without parameters") {
  CHECK(names_extension("PIPELINING", "PIPELINING"));
  CHECK(names_extension("pipelining", "PIPELINING"));
  CHECK(names_extension("SIZE 10240000", "SIZE"));
  CHECK(names_extension("SIZE", "SIZE"));
  CHECK_FALSE(names_extension("PIPELININGX", "PIPELINING"));
  CHECK_FALSE(names_extension("SIZES", "SIZE"));
  CHECK_FALSE(names_extension("8BITMIME", "PIPELINING"));
  CHECK_FALSE(names_extension("", "SIZE"));
}

}  // namespace
}  // namespace squall::mail::detail

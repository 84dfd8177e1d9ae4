#include "http/parser.hpp"

#include <doctest/doctest.h>

#include <limits>
#include <string>
#include <vector>

using squall::http::Limits;
using squall::http::ParseEvent;
using squall::http::ParsePhase;
using squall::http::Request;
using squall::http::RequestParser;

namespace {

// What one parsed message looked like, copied out before the parser moves on.
struct Parsed {
  std::string method;
  std::string target;
  std::string path;
  std::string query;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
  bool keep_alive = false;
};

struct Outcome {
  std::vector<Parsed> messages;
  int error_status = 0;
  std::string reason;
  int continues = 0;
};

Parsed copy_of(const Request& request, const RequestParser& parser) {
  Parsed parsed{std::string(request.method()),
                std::string(request.target()),
                std::string(request.path()),
                std::string(request.raw_query()),
                {},
                std::string(request.body()),
                parser.keep_alive()};
  for (const auto& header : request.headers()) {
    parsed.headers.emplace_back(std::string(header.name), std::string(header.value));
  }
  return parsed;
}

// Feeds `input` as the connection does: one contiguous buffer, delivered in pieces that end at
// `splits` (ascending offsets), parsing everything available after each delivery.
Outcome parse(const std::string& input, const std::vector<std::size_t>& splits,
              const Limits& limits = Limits{}) {
  RequestParser parser(limits);
  Request request;
  parser.attach(&request);
  Outcome outcome;
  std::size_t begin = 0;
  std::vector<std::size_t> ends = splits;
  ends.push_back(input.size());
  for (const std::size_t end : ends) {
    while (begin < end) {
      const auto result = parser.feed(input.data() + begin, end - begin);
      begin += result.consumed;
      if (result.event == ParseEvent::need_more) break;
      if (result.event == ParseEvent::error) {
        outcome.error_status = parser.error_status();
        outcome.reason = std::string(parser.error_reason());
        return outcome;
      }
      if (result.event == ParseEvent::expect_continue) {
        ++outcome.continues;
        parser.continue_after_expect();
        continue;
      }
      outcome.messages.push_back(copy_of(request, parser));
      parser.next_message();
    }
  }
  return outcome;
}

Outcome parse_whole(const std::string& input, const Limits& limits = Limits{}) {
  return parse(input, {}, limits);
}

std::vector<std::size_t> every_byte(const std::string& input) {
  std::vector<std::size_t> splits;
  for (std::size_t i = 1; i < input.size(); ++i) splits.push_back(i);
  return splits;
}

const std::string kGet =
    "GET /a%20b/c?x=1&y=two HTTP/1.1\r\nHost: example.test\r\nUser-Agent: t\r\n\r\n";
const std::string kChunkedPost =
    "POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer-A: x\r\n\r\n";

}  // namespace

TEST_CASE("llhttp runs with every lenient flag off") {
  Limits limits;
  RequestParser parser(limits);
  CHECK(parser.llhttp().lenient_flags == 0);
}

TEST_CASE("a GET is parsed into method, target, decoded path, query and headers") {
  const Outcome outcome = parse_whole(kGet);
  REQUIRE(outcome.messages.size() == 1);
  const Parsed& message = outcome.messages[0];
  CHECK(message.method == "GET");
  CHECK(message.target == "/a%20b/c?x=1&y=two");
  CHECK(message.path == "/a b/c");
  CHECK(message.query == "x=1&y=two");
  REQUIRE(message.headers.size() == 2);
  CHECK(message.headers[0] == std::pair<std::string, std::string>{"Host", "example.test"});
  CHECK(message.keep_alive);
}

TEST_CASE("the same message split at every point parses identically") {
  for (const std::string& input : {kGet, kChunkedPost}) {
    const Outcome whole = parse_whole(input);
    REQUIRE(whole.messages.size() == 1);
    for (std::size_t split = 1; split < input.size(); ++split) {
      CAPTURE(split);
      const Outcome pieces = parse(input, {split});
      REQUIRE(pieces.messages.size() == 1);
      CHECK(pieces.messages[0].target == whole.messages[0].target);
      CHECK(pieces.messages[0].path == whole.messages[0].path);
      CHECK(pieces.messages[0].headers == whole.messages[0].headers);
      CHECK(pieces.messages[0].body == whole.messages[0].body);
    }
  }
}

TEST_CASE("CR in body data is data, not framing") {
  const std::string input =
      "POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\na\rb\r"
      "POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n\rx\r\n0\r\n\r\n";
  for (const auto& splits : {std::vector<std::size_t>{}, every_byte(input)}) {
    const Outcome outcome = parse(input, splits);
    REQUIRE(outcome.messages.size() == 2);
    CHECK(outcome.messages[0].body == "a\rb\r");
    CHECK(outcome.messages[1].body == "\rx");
  }
}

TEST_CASE("one byte at a time") {
  const Outcome outcome = parse(kChunkedPost, every_byte(kChunkedPost));
  REQUIRE(outcome.messages.size() == 1);
  CHECK(outcome.messages[0].body == "hello world");
  CHECK(outcome.messages[0].headers.size() == 2);  // Trailers are not headers.
}

TEST_CASE("pipelined messages come out one at a time, in order") {
  std::string input;
  for (int i = 0; i < 16; ++i)
    input += "GET /" + std::to_string(i) + " HTTP/1.1\r\nHost: h\r\n\r\n";
  input += "POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc";
  for (const auto& splits : {std::vector<std::size_t>{}, every_byte(input)}) {
    const Outcome outcome = parse(input, splits);
    REQUIRE(outcome.messages.size() == 17);
    for (int i = 0; i < 16; ++i) CHECK(outcome.messages[i].path == "/" + std::to_string(i));
    CHECK(outcome.messages[16].body == "abc");
  }
}

TEST_CASE("HTTP/1.0 closes unless keep-alive is asked; Connection: close closes") {
  CHECK_FALSE(parse_whole("GET / HTTP/1.0\r\n\r\n").messages.at(0).keep_alive);
  CHECK(parse_whole("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").messages.at(0).keep_alive);
  CHECK_FALSE(parse_whole("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                  .messages.at(0)
                  .keep_alive);
}

TEST_CASE("absolute-form targets route by their path") {
  const Outcome outcome =
      parse_whole("GET http://example.test/plaintext?q HTTP/1.1\r\nHost: h\r\n\r\n");
  REQUIRE(outcome.messages.size() == 1);
  CHECK(outcome.messages[0].path == "/plaintext");
  CHECK(outcome.messages[0].query == "q");
  CHECK(parse_whole("GET http://example.test HTTP/1.1\r\nHost: h\r\n\r\n").messages.at(0).path ==
        "/");
}

TEST_CASE("Expect: 100-continue pauses after the headers once, only with a body") {
  const std::string with_body =
      "POST /echo HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok";
  const Outcome outcome = parse_whole(with_body);
  CHECK(outcome.continues == 1);
  REQUIRE(outcome.messages.size() == 1);
  CHECK(outcome.messages[0].body == "ok");
  const Outcome empty = parse_whole(
      "POST /echo HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n");
  CHECK(empty.continues == 0);
  CHECK(empty.messages.size() == 1);
  CHECK(parse_whole("POST / HTTP/1.1\r\nHost: h\r\nExpect: x\r\nContent-Length: 1\r\n\r\nx")
            .error_status == 417);
}

TEST_CASE("limits answer 414, 431 and 413 as the bytes arrive") {
  Limits limits;
  limits.max_url_bytes = 32;
  limits.max_header_bytes = 1024;
  limits.max_header_count = 4;
  limits.max_body_bytes = 10;
  limits.max_chunk_extension_bytes = 8;
  CHECK(parse_whole("GET /" + std::string(40, 'a') + " HTTP/1.1\r\nHost: h\r\n\r\n", limits)
            .error_status == 414);
  CHECK(
      parse_whole("GET / HTTP/1.1\r\nHost: h\r\nX: " + std::string(2000, 'a') + "\r\n\r\n", limits)
          .error_status == 431);
  // An endless header line is refused before its end arrives.
  CHECK(parse_whole("GET / HTTP/1.1\r\nHost: h\r\nX: " + std::string(2000, 'a'), limits)
            .error_status == 431);
  // So is endless whitespace, which no callback reports.
  CHECK(parse_whole("GET / HTTP/1.1\r\nHost: h\r\nX:" + std::string(4000, ' '), limits)
            .error_status == 431);
  std::string many = "GET / HTTP/1.1\r\nHost: h\r\n";
  for (int i = 0; i < 5; ++i) many += "X" + std::to_string(i) + ": v\r\n";
  CHECK(parse_whole(many + "\r\n", limits).error_status == 431);
  CHECK(parse_whole("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n", limits)
            .error_status == 413);
  CHECK(parse_whole("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "6\r\nabcdef\r\n6\r\nabcdef\r\n0\r\n\r\n",
                    limits)
            .error_status == 413);
  CHECK(parse_whole("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "1;aaaaaaaaaaaaaaaaaaaa\r\na\r\n0\r\n\r\n",
                    limits)
            .error_status == 413);
}

TEST_CASE("ambiguous framing and malformed requests are refused") {
  struct Case {
    std::string name;
    std::string input;
    int status;
  };
  const std::vector<Case> cases = {
      {"CL with TE",
       "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
       400},
      {"TE with CL",
       "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
       400},
      {"two CL", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 0\r\n\r\n",
       400},
      {"CL list", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\n", 400},
      {"CL plus", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\n", 400},
      {"CL hex", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x5\r\n\r\n", 400},
      {"CL negative", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400},
      {"CL overflow",
       "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400},
      {"TE not chunked last",
       "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400},
      {"TE gzip", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 400},
      {"TE space before colon", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n",
       400},
      {"TE xchunked", "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n", 400},
      {"two TE",
       "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: "
       "chunked\r\n\r\n",
       400},
      {"obs-fold first line", "GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400},
      {"obs-fold continuation", "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n Content-Length: 5\r\n\r\n",
       400},
      {"bare CR", "GET / HTTP/1.1\r\nHost: a\r\nX: \rTransfer-Encoding: chunked\r\n\r\n", 400},
      {"bare LF", "GET / HTTP/1.1\nHost: a\n\n", 400},
      {"bare CR ends head", "GET / HTTP/1.1\r\nHost: a\r\n\rXGET /evil HTTP/1.1\r\n\r\n", 400},
      {"bare CR in chunk size line",
       "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\rXhello\r\n0\r\n\r\n",
       400},
      {"bare CR after chunk data",
       "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\rX0\r\n\r\n",
       400},
      {"bare CR after last chunk",
       "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\rX", 400},
      {"NUL in value", std::string("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n", 35), 400},
      {"chunk size junk",
       "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1junk\r\nx\r\n0\r\n\r\n",
       400},
      {"chunk size 0x",
       "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0x1\r\nx\r\n0\r\n\r\n",
       400},
      {"chunk size space",
       "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
       400},
      {"chunk size huge",
       "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\nx\r\n",
       400},
      {"no CRLF after chunk",
       "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello0\r\n\r\n", 400},
      {"LF in chunk extension",
       "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;\nhello\r\n0\r\n\r\n",
       400},
      {"no Host", "GET / HTTP/1.1\r\n\r\n", 400},
      {"two Host", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400},
      {"Host list", "GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", 400},
      {"HTTP/2.0", "GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505},
      {"HTTP/1.2", "GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505},
      {"HTTP/0.9", "GET /\r\n\r\n", 400},
      {"HTTP/0.9 without a blank line", "GET /\r\n", 400},
      {"junk instead of CRLF after chunk data",
       "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
       400},
      {"LF alone after chunk data",
       "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\nX0\r\n\r\n",
       400},
      {"bad escape", "GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n", 400},
      {"encoded NUL", "GET /a%00 HTTP/1.1\r\nHost: a\r\n\r\n", 400},
      {"CONNECT", "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501},
  };
  for (const Case& c : cases) {
    CAPTURE(c.name);
    const Outcome whole = parse_whole(c.input);
    CHECK(whole.messages.empty());
    CAPTURE(whole.reason);
    CHECK(whole.error_status == c.status);
    // Split delivery must reach the same verdict.
    const Outcome bytes = parse(c.input, every_byte(c.input));
    CHECK(bytes.messages.empty());
    CHECK(bytes.error_status == c.status);
  }
}

TEST_CASE("relocate follows a moved buffer") {
  Limits limits;
  RequestParser parser(limits);
  Request request;
  parser.attach(&request);
  std::string first(64, '#');
  const std::string head = "GET /moved HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n";
  first.replace(10, head.size(), head);
  auto result = parser.feed(first.data() + 10, head.size());
  REQUIRE(result.event == ParseEvent::need_more);
  CHECK(parser.phase() == ParsePhase::head);
  // Move the head to a new buffer and continue there, as the connection's compaction does.
  std::string second = head + "X-B: 2\r\n\r\n";
  parser.relocate(first.data() + 10, first.data() + 10 + head.size(),
                  second.data() - (first.data() + 10));
  first.assign(first.size(), '!');
  result = parser.feed(second.data() + head.size(), second.size() - head.size());
  REQUIRE(result.event == ParseEvent::message_complete);
  CHECK(request.path() == "/moved");
  REQUIRE(request.headers().size() == 3);
  CHECK(request.headers()[1].value == "1");
  CHECK(request.headers()[2].value == "2");
}

TEST_CASE("RFC 9112 framing rules llhttp 8.1 lets through are enforced at every split point") {
  struct Case {
    std::string name;
    std::string input;
  };
  const std::vector<Case> cases = {
      // 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing.
      {"TE in HTTP/1.0",
       "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"},
      {"TE in HTTP/1.0 with Host",
       "POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"},
      {"TE gzip in HTTP/1.0", "GET / HTTP/1.0\r\nTransfer-Encoding: gzip\r\n\r\n"},
      // 5.1: no whitespace between a field name and its colon.
      {"space before colon", "GET / HTTP/1.1\r\nHost: h\r\nX-Custom : 1\r\n\r\n"},
      {"spaces before colon", "GET / HTTP/1.1\r\nX-Custom   : 1\r\nHost: h\r\n\r\n"},
      {"space before colon of Host", "GET / HTTP/1.1\r\nHost : h\r\n\r\n"},
      {"space before colon of a trailer",
       "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T : 1\r\n\r\n"},
      {"tab before colon", "GET / HTTP/1.1\r\nHost: h\r\nX-Custom\t: 1\r\n\r\n"},
      // 3.2: Host must be uri-host [":" port].
      {"Host with userinfo", "GET / HTTP/1.1\r\nHost: user@host\r\n\r\n"},
      {"Host with a path", "GET / HTTP/1.1\r\nHost: host/x\r\n\r\n"},
      {"Host with an open bracket", "GET / HTTP/1.1\r\nHost: [::1\r\n\r\n"},
      {"Host with two ports", "GET / HTTP/1.1\r\nHost: host:1:80\r\n\r\n"},
      {"Host with a letter in the port", "GET / HTTP/1.1\r\nHost: host:8o\r\n\r\n"},
      {"Host with a bad escape", "GET / HTTP/1.1\r\nHost: ho%zzst\r\n\r\n"},
      {"Host with a bad IPv6 literal", "GET / HTTP/1.1\r\nHost: [::g]:80\r\n\r\n"},
      {"Host with text after the literal", "GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n"},
      {"Host with a query", "GET / HTTP/1.1\r\nHost: host?x\r\n\r\n"},
      {"Host with a fragment", "GET / HTTP/1.1\r\nHost: host#x\r\n\r\n"},
      {"Host with a bad IPvFuture", "GET / HTTP/1.1\r\nHost: [v1]\r\n\r\n"},
      {"HTTP/1.0 with a bad Host", "GET / HTTP/1.0\r\nHost: a@b\r\n\r\n"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.name);
    const Outcome whole = parse_whole(c.input);
    CAPTURE(whole.reason);
    CHECK(whole.messages.empty());
    CHECK(whole.error_status == 400);
    for (std::size_t split = 1; split < c.input.size(); ++split) {
      CAPTURE(split);
      const Outcome pieces = parse(c.input, {split});
      CHECK(pieces.messages.empty());
      CHECK(pieces.error_status == 400);
    }
    const Outcome bytes = parse(c.input, every_byte(c.input));
    CHECK(bytes.messages.empty());
    CHECK(bytes.error_status == 400);
  }
}

TEST_CASE("valid Host values are accepted at every split point") {
  for (const std::string host :
       {"example.test", "example.test:8080", "127.0.0.1", "127.0.0.1:80", "[::1]", "[::1]:8080",
        "[2001:db8::1]:443", "[v1.fe80::a+en1]", "xn--bcher-kva.example",
        "a-b_c~d.e!$&'()*+;=", "ho%41st", "host:", ""}) {
    const std::string input = "GET / HTTP/1.1\r\nHost: " + host + "\r\n\r\n";
    CAPTURE(input);
    const Outcome whole = parse_whole(input);
    CAPTURE(whole.reason);
    REQUIRE(whole.messages.size() == 1);
    CHECK(whole.messages[0].headers[0].second == host);
    for (std::size_t split = 1; split < input.size(); ++split) {
      CAPTURE(split);
      CHECK(parse(input, {split}).messages.size() == 1);
    }
  }
  // HTTP/1.0 without Transfer-Encoding and without Host is still served.
  CHECK(parse_whole("POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi").messages.size() == 1);
}

TEST_CASE("a declared Content-Length reserves nothing until its bytes arrive") {
  Limits limits;
  limits.max_body_bytes = 512 * 1024 * 1024;
  RequestParser parser(limits);
  Request request;
  parser.attach(&request);
  const std::string head = "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 500000000\r\n\r\nabc";
  const auto result = parser.feed(head.data(), head.size());
  CHECK(result.event == ParseEvent::need_more);
  CHECK(request.body() == "abc");
  CHECK(parser.body_bytes_charged() < 64 * 1024);
}

TEST_CASE("a huge declared Content-Length under a huge limit is no allocation and no crash") {
  // Reserving the declared length used to throw inside the llhttp callback: std::terminate.
  Limits limits;
  limits.max_body_bytes = std::numeric_limits<std::size_t>::max();
  RequestParser parser(limits);
  Request request;
  parser.attach(&request);
  const std::string head =
      "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4611686018427387904\r\n\r\nxyz";
  const auto result = parser.feed(head.data(), head.size());
  CHECK(result.event == ParseEvent::need_more);
  CHECK(request.body() == "xyz");
}

TEST_CASE("request bodies are charged to the server-wide budget and given back") {
  Limits limits;
  limits.max_body_bytes = 1024 * 1024;
  squall::http::MemoryBudget budget;
  budget.limit = 256 * 1024;
  const std::string body(100 * 1024, 'x');
  const std::string message =
      "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: " + std::to_string(body.size()) + "\r\n\r\n" +
      body;

  RequestParser first(limits, &budget);
  Request first_request;
  first.attach(&first_request);
  const auto done = first.feed(message.data(), message.size());
  REQUIRE(done.event == ParseEvent::message_complete);
  CHECK(first_request.body() == body);
  CHECK(budget.used == first.body_bytes_charged());
  CHECK(budget.used >= body.size());

  // A second body that does not fit beside the first is refused with 503, as it arrives.
  RequestParser second(limits, &budget);
  Request second_request;
  second.attach(&second_request);
  const std::string big_body(200 * 1024, 'y');
  const std::string big =
      "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: " + std::to_string(big_body.size()) +
      "\r\n\r\n" + big_body;
  std::size_t offset = 0;
  squall::http::FeedResult result{ParseEvent::need_more, 0};
  while (offset < big.size()) {
    const std::size_t piece = std::min<std::size_t>(4096, big.size() - offset);
    result = second.feed(big.data() + offset, piece);
    offset += result.consumed;
    if (result.event != ParseEvent::need_more) break;
  }
  CHECK(result.event == ParseEvent::error);
  CHECK(second.error_status() == 503);
  CHECK(std::string(second.error_reason()).find("max_buffered_body_bytes") != std::string::npos);
  second.release_body_budget();

  // Answered: a body above 64 KiB is freed and its bytes go back.
  first.next_message();
  CHECK(budget.used == 0);
  CHECK(first.body_bytes_charged() == 0);

  RequestParser third(limits, &budget);
  Request third_request;
  third.attach(&third_request);
  CHECK(third.feed(big.data(), big.size()).event == ParseEvent::message_complete);
  CHECK(third_request.body() == big_body);
  third.release_body_budget();
  CHECK(budget.used == 0);
}

namespace {

struct Streamed {
  std::string queue;     // Body bytes handed to the stream's queue.
  std::string buffered;  // Request::body() at completion (must stay empty).
  int body_begins = 0;   // Pauses before the body.
  int completes = 0;     // Messages completed.
  std::uint64_t received = 0;
  int error_status = 0;
  std::string reason;
};

// As parse(), with the connection's streamed-body protocol: pause before every body, then let
// the body flow into a queue.
Streamed parse_streamed(const std::string& input, const std::vector<std::size_t>& splits,
                        const Limits& limits = Limits{}) {
  RequestParser parser(limits);
  Request request;
  parser.attach(&request);
  parser.pause_before_body(true);
  Streamed outcome;
  std::size_t begin = 0;
  std::vector<std::size_t> ends = splits;
  ends.push_back(input.size());
  for (const std::size_t end : ends) {
    while (begin < end) {
      const auto result = parser.feed(input.data() + begin, end - begin);
      begin += result.consumed;
      if (result.event == ParseEvent::need_more) break;
      if (result.event == ParseEvent::error) {
        outcome.error_status = parser.error_status();
        outcome.reason = std::string(parser.error_reason());
        return outcome;
      }
      if (result.event == ParseEvent::body_begins || result.event == ParseEvent::expect_continue) {
        ++outcome.body_begins;
        parser.stream_body_into(&outcome.queue);
        parser.continue_after_expect();
        continue;
      }
      ++outcome.completes;
      outcome.buffered += std::string(request.body());
      outcome.received = parser.body_bytes_received();
      parser.next_message();
    }
  }
  return outcome;
}

}  // namespace

TEST_CASE("a streamed body goes to the queue at every split point, chunked and Content-Length") {
  const std::string with_length =
      "POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world";
  for (const std::string& input : {kChunkedPost, with_length}) {
    CAPTURE(input);
    const Streamed whole = parse_streamed(input, {});
    CHECK(whole.queue == "hello world");
    const std::vector<std::size_t> all = every_byte(input);
    for (const std::size_t split : all) {
      CAPTURE(split);
      const Streamed outcome = parse_streamed(input, {split});
      CHECK(outcome.error_status == 0);
      CHECK(outcome.body_begins == 1);
      CHECK(outcome.completes == 1);
      CHECK(outcome.queue == "hello world");
      CHECK(outcome.buffered.empty());
      CHECK(outcome.received == 11);
    }
    const Streamed one_byte = parse_streamed(input, all);
    CHECK(one_byte.queue == "hello world");
    CHECK(one_byte.completes == 1);
  }
}

TEST_CASE("the parser pauses before a body only when asked, and never for a bodiless request") {
  const Streamed get = parse_streamed(kGet, {});
  CHECK(get.body_begins == 0);
  CHECK(get.completes == 1);
  // Without pause_before_body the body is buffered as before.
  const Outcome buffered = parse_whole(kChunkedPost);
  REQUIRE(buffered.messages.size() == 1);
  CHECK(buffered.messages[0].body == "hello world");
}

TEST_CASE("a streamed chunked body above max_body_bytes is refused with 413 at every split") {
  Limits limits;
  limits.max_body_bytes = 8;
  for (const std::size_t split : every_byte(kChunkedPost)) {
    CAPTURE(split);
    const Streamed outcome = parse_streamed(kChunkedPost, {split}, limits);
    CHECK(outcome.error_status == 413);
    CHECK(outcome.reason.find("max_body_bytes") != std::string::npos);
    CHECK(outcome.queue.size() <= 8);
  }
}

TEST_CASE("a discarded body is dropped and the next message follows") {
  const std::string input = "POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello" + kGet;
  const Limits limits;
  RequestParser parser(limits);
  Request request;
  parser.attach(&request);
  parser.pause_before_body(true);
  auto result = parser.feed(input.data(), input.size());
  REQUIRE(result.event == ParseEvent::body_begins);
  CHECK(parser.body_bytes_left() == 5);
  parser.discard_body();
  parser.continue_after_expect();
  std::size_t begin = result.consumed;
  result = parser.feed(input.data() + begin, input.size() - begin);
  REQUIRE(result.event == ParseEvent::message_complete);
  CHECK(request.body().empty());
  CHECK(parser.body_bytes_received() == 5);
  begin += result.consumed;
  parser.next_message();
  result = parser.feed(input.data() + begin, input.size() - begin);
  REQUIRE(result.event == ParseEvent::message_complete);
  CHECK(request.method() == "GET");
}

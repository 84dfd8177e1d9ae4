#include "http/fast_head.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "http/parser_trace.hpp"

using squall::http::Header;
using squall::http::Limits;
using squall::http::testing::ParserTrace;
using squall::http::testing::trace_parser;

namespace {

bool fast_path_reads(const std::string& input) {
  squall::http::detail::SimpleHead head;
  std::vector<Header> headers;
  return squall::http::detail::scan_simple_head(input.data(), input.size(), head, headers);
}

Limits small_limits() {
  Limits limits;
  limits.max_url_bytes = 12;
  limits.max_header_bytes = 40;
  limits.max_header_count = 3;
  limits.max_body_bytes = 16;
  return limits;
}

// Runs `input` through both paths, whole and split at each offset in `splits` (one split per
// run), under the default and under small limits; every run must see the same thing.
// Returns how many of the runs completed at least one message.
int compare_paths(const std::string& input, const std::vector<std::size_t>& splits) {
  int completed = 0;
  for (const Limits& limits : {Limits{}, small_limits()}) {
    std::vector<std::vector<std::size_t>> runs{{}};
    for (const std::size_t split : splits) runs.push_back({split});
    for (const auto& run : runs) {
      const ParserTrace fast = trace_parser(input, run, limits, true);
      const ParserTrace llhttp = trace_parser(input, run, limits, false);
      if (fast.text != llhttp.text || fast.stalled || llhttp.stalled) {
        CAPTURE(input);
        CAPTURE(run.empty() ? 0 : run[0]);
        CHECK(fast.text == llhttp.text);
        CHECK_FALSE(fast.stalled);
        return completed;
      }
      if (fast.messages > 0) ++completed;
    }
  }
  return completed;
}

std::vector<std::size_t> every_split(const std::string& input) {
  std::vector<std::size_t> splits;
  for (std::size_t i = 1; i < input.size(); ++i) splits.push_back(i);
  return splits;
}

const std::vector<std::string> kRequestLines = {
    "GET / HTTP/1.1",
    "GET /plaintext HTTP/1.1",
    "HEAD /a?b=c&d HTTP/1.1",
    "POST /email HTTP/1.1",
    "PUT /x/y HTTP/1.0",
    "DELETE /jobs/12 HTTP/1.1",
    "OPTIONS /o HTTP/1.1",
    "PATCH /p?q HTTP/1.1",
    "GET /a%20b HTTP/1.1",
    "GET /a#frag HTTP/1.1",
    "GET /?x=%zz HTTP/1.1",
    "GET * HTTP/1.1",
    "OPTIONS * HTTP/1.1",
    "GET http://h/a HTTP/1.1",
    "GET /averyveryverylongtarget HTTP/1.1",
    "GET /a HTTP/1.2",
    "GET /a HTTP/2.0",
    "GET /a HTTP/0.9",
    "GET /a http/1.1",
    "GET /a",
    "GET /a HTTP/1.1 ",
    "GET  /a HTTP/1.1",
    "GET /a  HTTP/1.1",
    "get /a HTTP/1.1",
    "GETS /a HTTP/1.1",
    "PUTT /a HTTP/1.1",
    "PAT /a HTTP/1.1",
    "CONNECT h:80 HTTP/1.1",
    "TRACE / HTTP/1.1",
    "PRI * HTTP/2.0",
    "GET /\x7f HTTP/1.1",
    "GET /\x80 HTTP/1.1",
    "GET /a\tb HTTP/1.1",
    "GET /a\"<>\\^`{|} HTTP/1.1",
};

const std::vector<std::string> kHeaderSets = {
    "Host: a\r\n",
    "Host: example.test:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n",
    "Host: [::1]:80\r\n",
    "Host: [v1.x]\r\n",
    "Host: [zz]\r\n",
    "Host: a, b\r\n",
    "Host: a,b\r\n",
    "Host: a_b~c!$&'()*+;=.-:8080\r\n",
    "Host: a:\r\n",
    "Host: :80\r\n",
    "Host: a:8x\r\n",
    "Host: a:80:80\r\n",
    "Host: 127.0.0.1:65535\r\n",
    "Host: a/b\r\n",
    "Host: a@b\r\n",
    "Host: a b\r\n",
    "Host: a:b\r\n",
    "Host: %41\r\n",
    "Host: %4\r\n",
    "Host:\r\n",
    "Host: \r\n",
    "Host:a\r\n",
    "Host:    a\r\n",
    "Host:\ta\r\n",
    "Host: a \r\n",
    "Host: a\t\r\n",
    "Host: a\r\nHost: a\r\n",
    "HOST: a\r\n",
    "",
    "X-A: 1\r\n",
    "Host: a\r\nConnection: keep-alive\r\n",
    "Host: a\r\nConnection: Keep-Alive\r\n",
    "Host: a\r\nConnection: close\r\n",
    "Host: a\r\nConnection: upgrade\r\nUpgrade: ws\r\n",
    "Host: a\r\nConnection: keep-alive, x\r\n",
    "Host: a\r\nProxy-Connection: close\r\n",
    "Connection: keep-alive\r\n",
    "Host: a\r\nContent-Length: 0\r\n",
    "Host: a\r\nContent-Length: 00\r\n",
    "Host: a\r\nContent-Length: 0 \r\n",
    "Host: a\r\nContent-Length: 3\r\n",
    "Host: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n",
    "Host: a\r\nContent-Length: 2\r\n",
    "Host: a\r\nContent-Length: 007\r\n",
    "Host: a\r\nContent-Length: 16\r\n",
    "Host: a\r\nContent-Length: 17\r\n",
    "Host: a\r\nContent-Length: 1 2\r\n",
    "Host: a\r\nContent-Length: 1,1\r\n",
    "Host: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n",
    "Host: a\r\nContent-Length: 0x1\r\n",
    "Host: a\r\nContent-Length: 123456789012345678\r\n",
    "Host: a\r\nContent-Length: 1234567890123456789\r\n",
    "Host: a\r\nContent-Length: 99999999999999999999999\r\n",
    "Host: a\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n",
    "Host: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n",
    "Host: a\r\nContent-Length: 2\r\nConnection: close\r\n",
    "Host: a\r\nContent-Length: +0\r\n",
    "Host: a\r\nTransfer-Encoding: chunked\r\n",
    "Host: a\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n",
    "Host: a\r\nExpect: 100-continue\r\n",
    "Host: a\r\nExpect: 100-continue\r\nContent-Length: 0\r\n",
    "Host: a\r\nExpect: other\r\n",
    "Host: a\r\nUpgrade: h2c\r\n",
    "Host: a\r\nX-Custom : 1\r\n",
    "Host: a\r\n X-Fold: 1\r\n",
    "Host: a\r\nX-Fold: 1\r\n 2\r\n",
    "Host: a\r\nX-Fold: 1\r\n\t2\r\n",
    " Host: a\r\n",
    "Host: a\r\nX-Bare: a\rb\r\n",
    std::string("Host: a\r\nX-Nul: a\0b\r\n", 21),
    "Host: a\r\nX-Del: a\x7f\r\n",
    "Host: a\r\nX-High: caf\xc3\xa9\r\n",
    "Host: a\r\nX-Tab: a\tb\r\n",
    "Host: a\r\nX-Space: a b  c\r\n",
    "Host: a\r\n: novalue\r\n",
    "Host: a\r\nX_Under.score~!#$%&'*+^`|: v\r\n",
    "Host: a\r\nX(paren): v\r\n",
    "Host: a\r\nX-Empty:\r\n",
    "Host: a\r\nX-Empty: \r\n",
    "Host: a\r\nX-Long: 012345678901234567890123456789\r\n",
    "Host: a\r\nB: 1\r\nC: 2\r\nD: 3\r\n",
    "Host: a\r\nX-Colon: a:b::c\r\n",
    "Host: a\nX-Lf: 1\r\n",
    "Host: a\r\nX-Lf: 1\n",
};

}  // namespace

TEST_CASE("the fast head path reads the commonest heads") {
  CHECK(fast_path_reads("GET /plaintext HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"));
  CHECK(fast_path_reads("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
  CHECK(fast_path_reads("POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\nrest"));
  // An incomplete head, a body to come, or a connection to close: left to llhttp.
  CHECK_FALSE(fast_path_reads("GET / HTTP/1.1\r\nHost: a\r\n"));
  CHECK(fast_path_reads("POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx"));
  CHECK_FALSE(fast_path_reads("POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\nx"));
  CHECK_FALSE(fast_path_reads("GET / HTTP/1.0\r\n\r\n"));
  CHECK_FALSE(fast_path_reads("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"));
}

TEST_CASE("the fast head path spells each method as llhttp does") {
  for (const char* method : {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"}) {
    CAPTURE(method);
    const std::string input = std::string(method) + " / HTTP/1.1\r\nHost: a\r\n\r\n";
    squall::http::detail::SimpleHead head;
    std::vector<Header> headers;
    REQUIRE(squall::http::detail::scan_simple_head(input.data(), input.size(), head, headers));
    CHECK(head.method_name == method);
    CHECK(head.method_name == llhttp_method_name(static_cast<llhttp_method_t>(head.method)));
  }
}

TEST_CASE("a simple Host value is decided by one table lookup per byte") {
  using squall::http::detail::is_simple_host;
  CHECK(is_simple_host("example.test"));
  CHECK(is_simple_host("127.0.0.1:8080"));
  CHECK(is_simple_host(""));
  CHECK(is_simple_host("a:"));
  // Not simple (the full check decides): escapes, IP-literals, lists, stray bytes.
  CHECK_FALSE(is_simple_host("%41"));
  CHECK_FALSE(is_simple_host("[::1]:80"));
  CHECK_FALSE(is_simple_host("a,b"));
  CHECK_FALSE(is_simple_host("a:8x"));
  CHECK_FALSE(is_simple_host("a b"));
}

TEST_CASE("the fast head path and llhttp see the same generated heads, split at every point") {
  int completed = 0;
  int fast = 0;
  for (const std::string& line : kRequestLines) {
    for (const std::string& headers : kHeaderSets) {
      const std::string head = line + "\r\n" + headers + "\r\n";
      if (fast_path_reads(head)) ++fast;
      // Alone, twice (the second Host is the remembered one), followed by another request, and
      // followed by a request that llhttp reads.
      for (const std::string& after :
           {std::string(), head, std::string("GET /next HTTP/1.1\r\nHost: b\r\n\r\n"),
            std::string("\r\nPOST /b HTTP/1.1\r\nHost: b\r\nContent-Length: 2\r\n\r\nhi")}) {
        const std::string input = head + after;
        completed += compare_paths(
            input, after.empty() ? every_split(input) : std::vector<std::size_t>{head.size()});
      }
    }
  }
  // The grid reaches both sides of the subset's edge.
  CHECK(fast > 100);
  CHECK(completed > 1000);
}

TEST_CASE("the fast head path and llhttp agree on every near-miss byte of a simple head") {
  const std::string base =
      "GET /p/q?r=s HTTP/1.1\r\nHost: h.test:80\r\nX-Tok!en: v a l\r\nContent-Length: 0\r\n\r\n";
  REQUIRE(fast_path_reads(base));
  static constexpr char kNearMisses[] =
      "\0\t\n\r :;,#%/?\\\"()<>@[]{}\x7f\x80\xff"
      "0Aa~-";
  const std::string near_misses(kNearMisses, sizeof kNearMisses - 1);
  for (std::size_t i = 0; i < base.size(); ++i) {
    for (const char byte : near_misses) {
      std::string replaced = base;
      replaced[i] = byte;
      std::string inserted = base;
      inserted.insert(i, 1, byte);
      for (const std::string& input : {replaced, inserted}) {
        compare_paths(input, {input.size() / 2, i == 0 ? 1 : i});
      }
    }
    std::string removed = base;
    removed.erase(i, 1);
    compare_paths(removed, {i == 0 ? 1 : i});
  }
}

TEST_CASE("the fast head path takes a head after empty lines only once llhttp has skipped them") {
  const std::string input = "\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
  CHECK(compare_paths(input, every_split(input)) > 0);
}

TEST_CASE("a body that came whole with its head is read by the fast path as llhttp reads it") {
  const std::string head = "POST /email HTTP/1.1\r\nHost: a\r\nContent-Length: ";
  int completed = 0;
  for (const std::string& body :
       {std::string("x"), std::string("{\"to\": \"a@b\"}"), std::string("a\r\nb\rc\n\0d", 10),
        std::string(16, 'z'), std::string(17, 'y'), std::string(300, 'w')}) {
    const std::string message = head + std::to_string(body.size()) + "\r\n\r\n" + body;
    REQUIRE(fast_path_reads(message));
    {
      // Taken without llhttp, which would have read the version.
      squall::http::Limits limits;
      squall::http::RequestParser parser(limits);
      squall::http::Request request;
      parser.attach(&request);
      const auto result = parser.feed(message.data(), message.size());
      CHECK(result.event == squall::http::ParseEvent::message_complete);
      CHECK(result.consumed == message.size());
      CHECK(request.body() == body);
      CHECK(parser.declared_content_length() == static_cast<std::int64_t>(body.size()));
      CHECK(parser.llhttp().http_major == 0);
    }
    // Alone (split everywhere: a split inside the body leaves it to llhttp), cut short, and
    // followed by requests the fast path and llhttp read.
    completed += compare_paths(message, every_split(message));
    completed += compare_paths(message.substr(0, message.size() - 1), {});
    for (const std::string& after :
         {message, std::string("GET /next HTTP/1.1\r\nHost: b\r\n\r\n"),
          std::string("POST /c HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n"
                      "2\r\nhi\r\n0\r\n\r\n")}) {
      const std::string input = message + after;
      completed += compare_paths(input, {message.size(), message.size() - 1, head.size()});
    }
  }
  CHECK(completed > 100);
}

TEST_CASE("a body the fast path could read still stops before the body when a route streams") {
  for (const bool fast : {true, false}) {
    squall::http::Limits limits;
    squall::http::RequestParser parser(limits);
    parser.set_fast_head(fast);
    squall::http::Request request;
    parser.attach(&request);
    parser.pause_before_body(true);
    const std::string input = "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
    const auto first = parser.feed(input.data(), input.size());
    CAPTURE(fast);
    CHECK(first.event == squall::http::ParseEvent::body_begins);
    CHECK(first.consumed == input.size() - 3);
    CHECK(request.body().empty());
    parser.continue_after_expect();
    const auto second = parser.feed(input.data() + first.consumed, 3);
    CHECK(second.event == squall::http::ParseEvent::message_complete);
    CHECK(request.body() == "abc");
  }
}

TEST_CASE("a body over the server's body budget is refused alike on both paths") {
  std::string traces[2];
  for (const bool fast : {true, false}) {
    squall::http::Limits limits;
    squall::http::MemoryBudget budget;
    budget.limit = 10;  // Below what holding five bytes charges (the string's capacity).
    squall::http::RequestParser parser(limits, &budget);
    parser.set_fast_head(fast);
    squall::http::Request request;
    parser.attach(&request);
    const std::string input = "POST /email HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
    const auto result = parser.feed(input.data(), input.size());
    CAPTURE(fast);
    CHECK(result.event == squall::http::ParseEvent::error);
    CHECK(parser.error_status() == 503);
    CHECK(budget.used.load() == 0);
    traces[fast ? 0 : 1] = std::to_string(result.consumed) + " " +
                           std::to_string(parser.error_status()) + " " +
                           std::string(parser.error_reason());
  }
  CHECK(traces[0] == traces[1]);
}

TEST_CASE("a header name byte is a tchar for the fast path exactly when RFC 9110 says so") {
  const auto is_tchar = [](int c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c != 0 && std::string_view("!#$%&'*+-.^_`|~").find(static_cast<char>(c)) !=
                          std::string_view::npos);
  };
  // A 40-byte name is read sixteen bytes at a time where SSE2 is there; a 6-byte name at the
  // end of the head, byte by byte.
  for (const std::size_t name_size : {std::size_t{40}, std::size_t{6}}) {
    for (std::size_t at = 0; at < name_size; ++at) {
      for (int c = 0; c < 256; ++c) {
        std::string name(name_size, 'n');
        name[at] = static_cast<char>(c);
        const std::string input = "GET / HTTP/1.1\r\nHost: a\r\n" + name + ": v\r\n\r\n";
        squall::http::detail::SimpleHead head;
        std::vector<Header> headers;
        const bool read =
            squall::http::detail::scan_simple_head(input.data(), input.size(), head, headers);
        CAPTURE(name_size);
        CAPTURE(at);
        CAPTURE(c);
        if (is_tchar(c)) {
          REQUIRE(read);
          CHECK(headers.at(1).name == name);
        } else if (c == ':' && at > 0) {
          REQUIRE(read);
          CHECK(headers.at(1).name == name.substr(0, at));  // The name ends there.
        } else {
          CHECK_FALSE(read);
        }
        if (at % 7 == 0 || !is_tchar(c)) compare_paths(input, {});
      }
    }
  }
}

TEST_CASE("the fast path splits the target at its first '?' wherever it is") {
  // Targets up to 40 bytes (read sixteen bytes at a time where SSE2 is there) with one or two
  // '?' anywhere, followed by a short head and by a long one (the tail is read byte by byte
  // when fewer than sixteen bytes are left).
  int read = 0;
  for (std::size_t size = 1; size <= 40; ++size) {
    for (std::size_t first = 1; first <= size; ++first) {
      for (const std::size_t second : {std::size_t{0}, first + 1, size}) {
        std::string target = "/" + std::string(size - 1, 't');
        if (first < size) target[first] = '?';
        if (second > first && second < size) target[second] = '?';
        for (const std::string& rest :
             {std::string("\r\n\r\n"),
              std::string("\r\nHost: a\r\nX-Padding: 0123456789\r\n\r\n")}) {
          const std::string input = "GET " + target + " HTTP/1.1" + rest;
          CAPTURE(input);
          if (rest.size() > 4) {
            REQUIRE(fast_path_reads(input));
            ++read;
            squall::http::Limits limits;
            squall::http::RequestParser parser(limits);
            squall::http::Request request;
            parser.attach(&request);
            REQUIRE(parser.feed(input.data(), input.size()).event ==
                    squall::http::ParseEvent::message_complete);
            CHECK(parser.llhttp().http_major == 0);  // The fast path read it.
            const auto mark = target.find('?');
            CHECK(request.path() == target.substr(0, mark));
            CHECK(request.raw_query() ==
                  (mark == std::string::npos ? std::string() : target.substr(mark + 1)));
          }
          compare_paths(input, {});
        }
      }
    }
  }
  CHECK(read > 1000);
}

TEST_CASE("a Host value that differs from the remembered one in any byte is checked again") {
  // The remembered value is compared in words; each byte of it must count.
  for (std::size_t size = 1; size <= 24; ++size) {
    const std::string host(size, 'h');
    for (std::size_t at = 0; at < size; ++at) {
      for (const char bad : {',', ' ', '/', '@'}) {
        std::string other = host;
        other[at] = bad;
        const std::string input = "GET / HTTP/1.1\r\nHost: " + host +
                                  "\r\n\r\nGET / HTTP/1.1\r\nHost: " + other + "\r\n\r\n";
        CAPTURE(input);
        squall::http::Limits limits;
        squall::http::RequestParser parser(limits);
        squall::http::Request request;
        parser.attach(&request);
        const auto first = parser.feed(input.data(), input.size());
        REQUIRE(first.event == squall::http::ParseEvent::message_complete);
        parser.next_message();
        const auto second =
            parser.feed(input.data() + first.consumed, input.size() - first.consumed);
        if (bad == ' ' && (at == 0 || at + 1 == size)) {
          // Leading and trailing spaces are not part of the value: a shorter host, accepted.
          CHECK(second.event == squall::http::ParseEvent::message_complete);
        } else {
          CHECK(second.event == squall::http::ParseEvent::error);
          CHECK(parser.error_status() == 400);
        }
        compare_paths(input, {});
      }
    }
  }
}

TEST_CASE("\"Host:\" is recognised in any case and only with the colon right after it") {
  for (const std::string& line :
       {std::string("Host: a"), std::string("hOsT: a"), std::string("HOST:a"),
        std::string("Hosts: a"), std::string("Hos: a"), std::string("Host : a"),
        std::string("Ho\xd3t: a"), std::string("Hos\x14: a"), std::string("Host\x1a a"),
        std::string("H\x0fst: a"), std::string("Host;: a"), std::string("X-Host: a")}) {
    for (const std::string& version : {std::string("1.1"), std::string("1.0")}) {
      const std::string input =
          "GET / HTTP/" + version + "\r\n" + line + "\r\nConnection: keep-alive\r\n\r\n";
      CAPTURE(input);
      compare_paths(input, every_split(input));
    }
  }
  CHECK(fast_path_reads("GET / HTTP/1.1\r\nhOsT: a\r\n\r\n"));
  CHECK_FALSE(fast_path_reads("GET / HTTP/1.1\r\nHost : a\r\n\r\n"));
}

TEST_CASE("every byte of a target or a header value is taken or left as the subset says") {
  // Targets and values of 40 bytes are read sixteen bytes at a time where SSE2 is there; a
  // 6-byte value at the end of the head, byte by byte.
  for (const std::size_t size : {std::size_t{40}, std::size_t{6}}) {
    for (std::size_t at = 0; at < size; ++at) {
      for (int c = 0; c < 256; ++c) {
        CAPTURE(size);
        CAPTURE(at);
        CAPTURE(c);
        const bool visible = c >= 0x21 && c <= 0x7e;
        std::string value(size, 'v');
        value[at] = static_cast<char>(c);
        const std::string with_value = "GET / HTTP/1.1\r\nHost: a\r\nX-V: " + value + "\r\n\r\n";
        squall::http::detail::SimpleHead head;
        std::vector<Header> headers;
        const bool value_read = squall::http::detail::scan_simple_head(
            with_value.data(), with_value.size(), head, headers);
        if (visible) {
          REQUIRE(value_read);
          CHECK(headers.at(1).value == value);
        } else if (c == ' ') {
          // Inside the value a space is taken; first it is skipped, last it is refused.
          CHECK(value_read == (at + 1 < size));
        } else {
          CHECK_FALSE(value_read);
        }
        if (at == 0) continue;
        std::string target = "/" + std::string(size - 1, 't');
        target[at] = static_cast<char>(c);
        const std::string with_target = "GET " + target + " HTTP/1.1\r\nHost: a\r\n\r\n";
        CHECK(fast_path_reads(with_target) == (visible && c != '#' && c != '%'));
        if (at % 5 == 0 || !visible) {
          compare_paths(with_value, {});
          compare_paths(with_target, {});
        }
      }
    }
  }
}

TEST_CASE("the fast path grows the header vector as a head needs, from empty and when reused") {
  std::vector<Header> reused;
  for (std::size_t count = 0; count <= 40; ++count) {
    std::string input = "GET / HTTP/1.1\r\nHost: a\r\n";
    for (std::size_t i = 0; i < count; ++i) input += "X-" + std::to_string(i) + ": v\r\n";
    input += "\r\n";
    CAPTURE(count);
    squall::http::detail::SimpleHead head;
    std::vector<Header> fresh;
    REQUIRE(squall::http::detail::scan_simple_head(input.data(), input.size(), head, fresh));
    REQUIRE(squall::http::detail::scan_simple_head(input.data(), input.size(), head, reused));
    for (const std::vector<Header>* headers : {&fresh, &reused}) {
      REQUIRE(headers->size() == count + 1);
      CHECK(headers->back().name == (count == 0 ? "Host" : "X-" + std::to_string(count - 1)));
    }
    compare_paths(input, {});
  }
}

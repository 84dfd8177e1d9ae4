// Everything a connection and a handler see of a RequestParser run, written out as text, so two
// runs (the fast head path on and off) can be compared byte for byte. Shared by
// tests/unit/http/fast_head_test.cpp and fuzz/fast_head_fuzz.cpp.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "http/parser.hpp"

namespace squall::http::testing {

struct ParserTrace {
  std::string text;          // Events, messages and the final state.
  std::size_t messages = 0;  // Complete messages.
  bool error = false;        // The run ended in a refusal.
  bool stalled = false;      // A message was reported without consuming a byte: the parser is
                             // wrong, and feeding on would repeat that message forever.
};

inline void append_offset(std::string& out, std::string_view view, const char* base) {
  // An empty view's position means nothing to a handler; a non-empty one's is compared, so both
  // paths must point into the same bytes.
  if (view.empty()) {
    out += "-";
  } else {
    out += std::to_string(view.data() - base);
  }
}

inline void append_message(std::string& out, const Request& request, const RequestParser& parser,
                           const char* base) {
  out += "message ";
  out += request.method();
  out += ' ';
  out += request.target();
  out += " path=";
  out += request.path();
  out += " query=";
  out += request.raw_query();
  out += " @";
  append_offset(out, request.target(), base);
  out += '/';
  append_offset(out, request.raw_query(), base);
  out += " version=" + std::to_string(request.http_major()) + "." +
         std::to_string(request.http_minor());
  out += parser.keep_alive() ? " keep-alive" : " close";
  out += " declared=" + std::to_string(parser.declared_content_length());
  out += " received=" + std::to_string(parser.body_bytes_received());
  out += " start=" + std::to_string(parser.message_start() - base);
  out += " views_end=" + std::to_string(parser.views_end() - base);
  out += '\n';
  for (const Header& header : request.headers()) {
    out += "  header [";
    out += header.name;
    out += "] [";
    out += header.value;
    out += "] @";
    append_offset(out, header.name, base);
    out += '/';
    append_offset(out, header.value, base);
    out += '\n';
  }
  out += "  body [";
  out += request.body();
  out += "]\n";
}

// Feeds `input` as the connection does: one contiguous buffer, delivered in pieces that end at
// `splits` (ascending offsets), parsing everything available after each delivery, one message
// at a time.
inline ParserTrace trace_parser(std::string_view input, const std::vector<std::size_t>& splits,
                                const Limits& limits, bool fast_head) {
  MemoryBudget budget;
  budget.limit = 1024 * 1024;
  RequestParser parser(limits, &budget);
  parser.set_fast_head(fast_head);
  Request request;
  parser.attach(&request);
  ParserTrace trace;
  std::string& out = trace.text;
  const char* const base = input.data();
  std::size_t begin = 0;
  std::vector<std::size_t> ends = splits;
  ends.push_back(input.size());
  for (const std::size_t end : ends) {
    while (begin < end) {
      const FeedResult result = parser.feed(base + begin, end - begin);
      begin += result.consumed;
      out += "feed consumed=" + std::to_string(result.consumed) +
             " phase=" + std::to_string(static_cast<int>(parser.phase())) + '\n';
      if (result.event == ParseEvent::need_more) break;
      if (result.event == ParseEvent::error) {
        out += "error " + std::to_string(parser.error_status()) + " ";
        out += parser.error_reason();
        out += '\n';
        trace.error = true;
        return trace;
      }
      if (result.event == ParseEvent::expect_continue) {
        out += "continue\n";
        parser.continue_after_expect();
        continue;
      }
      if (result.consumed == 0) {
        // Every message has at least a request line, and the parser reports it while taking its
        // last byte; one that consumed nothing would come back at every feed.
        out += "stalled: a message without a byte consumed\n";
        trace.stalled = true;
        return trace;
      }
      append_message(out, request, parser, base);
      ++trace.messages;
      parser.next_message();
    }
  }
  out += "end phase=" + std::to_string(static_cast<int>(parser.phase())) +
         " budget=" + std::to_string(budget.used.load()) + '\n';
  return trace;
}

}  // namespace squall::http::testing

// libFuzzer target: the llhttp adapter (RequestParser) fed as the connection feeds it, one
// contiguous buffer delivered in pieces, with small limits and a body budget so every refusal
// path is reached. The first input byte picks the piece size. Checks: no crash or sanitizer
// report, every view of a complete message lies inside the input, the error status is one the
// parser documents, and the body budget is given back in full.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "http/parser.hpp"

namespace {

using squall::http::Limits;
using squall::http::MemoryBudget;
using squall::http::ParseEvent;
using squall::http::Request;
using squall::http::RequestParser;

void check(bool condition) {
  if (!condition) std::abort();
}

bool inside(std::string_view view, const char* begin, const char* end) {
  return view.empty() || (view.data() >= begin && view.data() + view.size() <= end);
}

void check_views(const Request& request, const char* begin, const char* end) {
  check(inside(request.target(), begin, end));
  check(inside(request.raw_query(), begin, end));
  for (const auto& header : request.headers()) {
    check(inside(header.name, begin, end));
    check(inside(header.value, begin, end));
    check(!header.name.empty());
  }
}

bool documented_status(int status) {
  switch (status) {
    case 400:
    case 408:
    case 413:
    case 414:
    case 417:
    case 431:
    case 501:
    case 503:
    case 505:
      return true;
    default:
      return false;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::size_t piece = 1 + data[0] % 64;
  const char* input = reinterpret_cast<const char*>(data + 1);
  const std::size_t length = size - 1;

  Limits limits;
  limits.max_url_bytes = 256;
  limits.max_header_bytes = 1024;
  limits.max_header_count = 16;
  limits.max_body_bytes = 4096;
  limits.max_chunk_extension_bytes = 64;
  MemoryBudget budget;
  budget.limit = 64 * 1024;
  RequestParser parser(limits, &budget);
  Request request;
  parser.attach(&request);

  std::size_t begin = 0;
  std::size_t available = 0;
  while (available < length) {
    available = std::min(length, available + piece);
    while (begin < available) {
      const auto result = parser.feed(input + begin, available - begin);
      check(result.consumed <= available - begin);
      begin += result.consumed;
      if (result.event == ParseEvent::need_more) break;
      if (result.event == ParseEvent::error) {
        check(documented_status(parser.error_status()));
        check(!parser.error_reason().empty());
        parser.release_body_budget();
        check(budget.used == 0);
        return 0;
      }
      if (result.event == ParseEvent::expect_continue) {
        parser.continue_after_expect();
        continue;
      }
      check(result.event == ParseEvent::message_complete);
      check(request.body().size() <= limits.max_body_bytes);
      check(request.http_major() == 1 && request.http_minor() <= 1);
      check_views(request, input, input + length);
      check(parser.body_bytes_charged() == budget.used);
      if (!parser.keep_alive()) {
        parser.release_body_budget();
        check(budget.used == 0);
        return 0;
      }
      parser.next_message();
    }
  }
  parser.release_body_budget();
  check(budget.used == 0);
  return 0;
}

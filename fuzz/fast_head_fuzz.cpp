// libFuzzer target: the fast head path (lib/http/fast_head.cpp) against llhttp. Each input runs
// through two RequestParsers, one trying the fast path first and one with llhttp alone, fed as
// the connection feeds them; everything a connection or handler would see (events, bytes
// consumed, every field of every request with its position in the input, keep-alive, the error
// status and reason) must be the same. The first input byte picks the piece size (0: whole) and
// whether the limits are small enough to be reached.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "http/parser_trace.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::size_t piece = data[0] % 64;
  const bool small_limits = (data[0] & 64) != 0;
  const std::string_view input(reinterpret_cast<const char*>(data + 1), size - 1);

  squall::http::Limits limits;
  if (small_limits) {
    limits.max_url_bytes = 16;
    limits.max_header_bytes = 64;
    limits.max_header_count = 4;
    limits.max_body_bytes = 32;
    limits.max_chunk_extension_bytes = 8;
  }
  std::vector<std::size_t> splits;
  if (piece > 0) {
    for (std::size_t end = piece; end < input.size(); end += piece) splits.push_back(end);
  }
  const auto fast = squall::http::testing::trace_parser(input, splits, limits, true);
  const auto llhttp = squall::http::testing::trace_parser(input, splits, limits, false);
  if (fast.text != llhttp.text || fast.stalled || llhttp.stalled) {
    std::fprintf(stderr, "fast head path:\n%s\nllhttp alone:\n%s\n", fast.text.c_str(),
                 llhttp.text.c_str());
    std::abort();
  }
  return 0;
}

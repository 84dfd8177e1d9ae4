// The bounds a connection enforces while it reads a request and writes a response.
#pragma once

#include <chrono>
#include <cstddef>

namespace squall::http {

struct Limits {
  std::size_t max_url_bytes = 8 * 1024;              // Longer request-target -> 414.
  std::size_t max_header_bytes = 16 * 1024;          // Header section (and trailers) -> 431.
  std::size_t max_header_count = 100;                // More header lines -> 431.
  std::size_t max_body_bytes = 1024 * 1024;          // Declared or received body -> 413.
  std::size_t max_chunk_extension_bytes = 4 * 1024;  // All chunk extensions of a body -> 413.
  std::size_t write_buffer_high_water = 256 * 1024;  // Unsent bytes above this stop reading.
};

struct Timeouts {
  std::chrono::milliseconds header{10'000};     // From a request's first byte to its last header.
  std::chrono::milliseconds body{30'000};       // Longest wait for the next body bytes.
  std::chrono::milliseconds keepalive{75'000};  // Idle time between requests.
  std::chrono::milliseconds write{30'000};      // Longest a pending write may make no progress.
  std::chrono::milliseconds lingering{2'000};   // Reading and discarding after an error reply.
};

}  // namespace squall::http

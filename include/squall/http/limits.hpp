// The bounds a connection enforces while it reads a request and writes a response.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <limits>

namespace squall::http {

struct Limits {
  std::size_t max_url_bytes = 8 * 1024;                    // Longer request-target -> 414.
  std::size_t max_header_bytes = 16 * 1024;                // Header section (and trailers) -> 431.
  std::size_t max_header_count = 100;                      // More header lines -> 431.
  std::size_t max_body_bytes = 1024 * 1024;                // Declared or received body -> 413.
  std::size_t max_chunk_extension_bytes = 4 * 1024;        // All chunk extensions of a body -> 413.
  std::size_t write_buffer_high_water = 256 * 1024;        // Unsent bytes above this stop reading.
  std::size_t max_buffered_body_bytes = 64 * 1024 * 1024;  // All connections' bodies -> 503.
  std::size_t max_unsent_bytes = 64 * 1024 * 1024;         // All connections' unsent output: pause.
  bool operator==(const Limits&) const = default;
};

struct Timeouts {
  std::chrono::milliseconds header{10'000};     // From a request's first byte (or the accept) to
                                                // its last header.
  std::chrono::milliseconds body{30'000};       // From the end of the head to the body's last byte.
  std::chrono::milliseconds keepalive{75'000};  // Idle time between requests.
  std::chrono::milliseconds write{30'000};      // Longest a pending write may make no progress.
  std::chrono::milliseconds lingering{2'000};   // Reading and discarding after an error reply.
  bool operator==(const Timeouts&) const = default;
};

// A byte budget shared by every connection of a server, or of several servers on several
// loops (workers): bodies being received, or response bytes the clients have not read yet.
// Relaxed atomics: any thread may take and give back; the total is what matters, not order.
struct MemoryBudget {
  std::atomic<std::size_t> limit{std::numeric_limits<std::size_t>::max()};  // Most held at once.
  std::atomic<std::size_t> used{0};                                         // Bytes held now.

  // Takes `bytes` if they fit under the limit; returns whether they did.
  bool try_take(std::size_t bytes) noexcept {
    const std::size_t most = limit.load(std::memory_order_relaxed);
    std::size_t now = used.load(std::memory_order_relaxed);
    do {
      if (now > most || bytes > most - now) return false;
    } while (!used.compare_exchange_weak(now, now + bytes, std::memory_order_relaxed));
    return true;
  }
  void take(std::size_t bytes) noexcept { used.fetch_add(bytes, std::memory_order_relaxed); }
  void give_back(std::size_t bytes) noexcept {
    // Nothing to give back is the common case (a request without a body): no locked
    // instruction on a line every worker's loop shares.
    if (bytes == 0) return;
    std::size_t now = used.load(std::memory_order_relaxed);
    while (!used.compare_exchange_weak(now, bytes < now ? now - bytes : 0,
                                       std::memory_order_relaxed)) {
    }
  }
  bool exhausted() const noexcept {
    return used.load(std::memory_order_relaxed) >= limit.load(std::memory_order_relaxed);
  }
};

}  // namespace squall::http

// Error and access logging on spdlog. Messages go through a bounded queue to one background
// thread, so a slow disk never blocks the event loop; files reopen on SIGUSR1 for logrotate.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include <spdlog/common.h>
#include <spdlog/logger.h>
#include <spdlog/sinks/base_sink.h>

namespace spdlog::details {
class thread_pool;
}

namespace squall::log {

struct Options {
  std::string level = "info";         // trace, debug, info, warn, error, critical, off
  std::string error_log = "stderr";   // "stderr" or a file path
  std::string access_log = "stderr";  // "stderr", "off" or a file path
  bool access_json = false;           // JSON lines instead of nginx's combined format
  std::size_t queue_size = 8192;      // Messages queued for the log thread; the oldest drop first
  // For journald (stderr under systemd): error log lines are "<N>message", N the syslog
  // priority (7 debug/trace, 6 info, 4 warning, 3 error, 2 critical), with no timestamp or
  // level name since the journal records both.
  bool journal = false;
};

// Parses a level name (trace, debug, info, warn/warning, error/err, critical, off). Throws
// std::invalid_argument.
spdlog::level::level_enum parse_level(std::string_view name);

// A sink appending to a file (O_APPEND, mode 0640) that can reopen its path, for logrotate.
// Each message is one write(2), so nothing is buffered in the process.
class ReopenableFileSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  // Opens (creating) `path`; throws std::runtime_error naming the path and strerror.
  explicit ReopenableFileSink(std::string path);
  ~ReopenableFileSink() override;
  // The path given at construction.
  const std::string& path() const noexcept { return path_; }
  // Closes and reopens the path now, under the sink mutex. On failure keeps the old file and
  // throws std::runtime_error naming the path and strerror.
  void reopen();
  // Asks the writing thread to reopen before its next write or flush (never blocks on I/O).
  void request_reopen() noexcept { reopen_requested_.store(true, std::memory_order_release); }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override;
  void flush_() override;

 private:
  void reopen_locked();
  void reopen_if_requested();

  std::string path_;
  int fd_ = -1;
  std::atomic<bool> reopen_requested_{false};
};

// What the access log records about one response.
struct AccessRecord {
  std::string_view remote_address;  // "203.0.113.7" or "::1"
  std::string_view method;          // Empty if the request line was never parsed
  std::string_view target;
  int http_major = 1;
  int http_minor = 1;
  int status = 0;
  std::uint64_t body_bytes_sent = 0;
  std::string_view referer;     // Empty when absent
  std::string_view user_agent;  // Empty when absent
  std::chrono::microseconds duration{0};
  std::chrono::system_clock::time_point time;
  std::uint64_t connection_id = 0;
};

// nginx's combined format (time in UTC, unsafe bytes as \xHH) plus " rt=SECONDS cid=ID"; no
// newline.
std::string format_combined(const AccessRecord& record);

// One JSON object (time, remote, method, target, version, status, bytes, referer, user_agent,
// duration_us, connection); invalid UTF-8 becomes U+FFFD; no newline.
std::string format_json(const AccessRecord& record);

namespace detail {
class FlushBarrier;
}

// The process's loggers and their background thread (`squall-log`, under SCHED_BATCH on
// Linux: a line queued does not preempt a loop on the writer's CPU). Create one at startup,
// before other threads log, and destroy it last.
class Logs {
 public:
  // Opens the targets and starts the log thread. Throws std::runtime_error for a file that
  // cannot be opened, std::invalid_argument for a bad level or option.
  explicit Logs(const Options& options);
  // Drains the queue, flushes, stops the thread and restores spdlog's previous default logger.
  ~Logs();
  Logs(const Logs&) = delete;
  Logs& operator=(const Logs&) = delete;

  // The error logger, also spdlog's default logger while this object lives.
  std::shared_ptr<spdlog::logger> error() const { return error_; }
  // Whether access() writes anything.
  bool access_enabled() const noexcept { return access_ != nullptr; }
  // Formats and queues one access log line, unless the access log is off.
  void access(const AccessRecord& record);
  // Reopens every log file (SIGUSR1). Only queues the work, so it never blocks on the disk;
  // messages logged after this call go to the new files.
  void reopen();
  // Messages dropped because the queue was full.
  std::uint64_t dropped_messages() const;
  // Changes the error log level; throws std::invalid_argument for an unknown name.
  void set_level(std::string_view level);
  // Waits (up to 5 s) until everything queued so far is written. Not for the event loop.
  void flush();

 private:
  void post_flushes();

  Options options_;
  std::shared_ptr<spdlog::details::thread_pool> pool_;
  std::shared_ptr<detail::FlushBarrier> barrier_;
  std::vector<std::shared_ptr<ReopenableFileSink>> files_;
  std::shared_ptr<spdlog::logger> error_;
  std::shared_ptr<spdlog::logger> access_;
  std::shared_ptr<spdlog::logger> previous_default_;
  std::mutex flush_mutex_;  // Keeps flush tickets in queue order.
  std::uint64_t flushes_posted_ = 0;
};

}  // namespace squall::log

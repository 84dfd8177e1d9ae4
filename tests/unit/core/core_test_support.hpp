// Helpers for the lib/core tests: run a Task to its end on a Loop, capture log lines.
#pragma once

#include <chrono>
#include <exception>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <type_traits>

#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include "squall/core/loop.hpp"
#include "squall/core/task.hpp"

namespace squall::testing {

template <typename T>
Task<void> store_into(Task<T> task, std::optional<T>* out) {
  T value = co_await std::move(task);
  out->emplace(std::move(value));
}

// Runs `task` on `loop` until it ends (a 10 s watchdog stops the loop); returns its value or
// rethrows its exception.
template <typename T>
T run_task(Loop& loop, Task<T> task, std::stop_token token = {}) {
  std::optional<std::conditional_t<std::is_void_v<T>, char, T>> value;
  std::exception_ptr error;
  bool done = false;
  Task<void> root;
  if constexpr (std::is_void_v<T>) {
    root = std::move(task);
  } else {
    root = store_into(std::move(task), &value);
  }
  const auto watchdog = loop.call_later(std::chrono::seconds(10), [&] { loop.stop(); });
  spawn(loop, std::move(root), std::move(token), [&](std::exception_ptr failure) {
    error = failure;
    done = true;
    loop.stop();
  });
  if (!done) loop.run();
  loop.cancel(watchdog);
  if (!done) throw std::runtime_error("run_task: the task did not finish within 10 s");
  if (error) std::rethrow_exception(error);
  if constexpr (!std::is_void_v<T>) return std::move(*value);
}

// Milliseconds since `start_ns` (uv_hrtime).
inline double elapsed_ms(std::uint64_t start_ns) {
  return static_cast<double>(uv_hrtime() - start_ns) / 1e6;
}

// Sends the default logger's lines to a string while it lives.
class CapturedLog {
 public:
  CapturedLog() : previous_(spdlog::default_logger()) {
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(stream_);
    auto logger = std::make_shared<spdlog::logger>("captured", sink);
    logger->set_level(spdlog::level::debug);
    spdlog::set_default_logger(logger);
  }
  ~CapturedLog() { spdlog::set_default_logger(previous_); }
  CapturedLog(const CapturedLog&) = delete;
  CapturedLog& operator=(const CapturedLog&) = delete;
  std::string text() const { return stream_.str(); }

 private:
  std::ostringstream stream_;
  std::shared_ptr<spdlog::logger> previous_;
};

}  // namespace squall::testing

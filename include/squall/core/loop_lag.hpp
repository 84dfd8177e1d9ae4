// Measures how late the loop runs a timer: the time a blocked loop made everyone wait.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>

#include <uv.h>

#include "squall/core/loop.hpp"

namespace squall {

class LoopLagMonitor {
 public:
  // Samples every `interval`; `on_sample` receives each lag in seconds (for a histogram).
  LoopLagMonitor(Loop& loop, std::chrono::milliseconds interval,
                 std::function<void(double lag_seconds)> on_sample);
  ~LoopLagMonitor();
  LoopLagMonitor(const LoopLagMonitor&) = delete;
  LoopLagMonitor& operator=(const LoopLagMonitor&) = delete;

  // The most recent lag, in seconds; 0 once stopped. Any thread, also while the loop thread
  // stops the monitor: it reads only an atomic of this object, never the timer's state.
  double last_lag_seconds() const noexcept;
  // Stops sampling (loop thread).
  void stop() noexcept;

 private:
  struct State;
  std::atomic<double> last_lag_seconds_{0};  // Written by the timer, read from any thread.
  std::unique_ptr<State> state_;             // Null once stopped (loop thread only).
};

}  // namespace squall

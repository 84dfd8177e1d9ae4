// Measures how late the loop runs a timer: the time a blocked loop made everyone wait.
#pragma once

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

  // The most recent lag, in seconds. Any thread.
  double last_lag_seconds() const noexcept;
  void stop() noexcept;

 private:
  struct State;
  std::unique_ptr<State> state_;  // Null once stopped.
};

}  // namespace squall

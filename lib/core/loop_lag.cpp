#include "squall/core/loop_lag.hpp"

#include <atomic>

#include "squall/core/uv_handle.hpp"

namespace squall {

struct LoopLagMonitor::State {
  UvHandle<uv_timer_t> timer;                       // Repeating; timer.data -> this.
  std::uint64_t interval_ns = 0;                    // The sampling period.
  std::uint64_t expected_ns = 0;                    // When the next tick should run (uv_hrtime).
  std::atomic<double>* last_lag_seconds = nullptr;  // The monitor's, which outlives this state.
  std::function<void(double)> on_sample;            // Where samples go.
};

LoopLagMonitor::LoopLagMonitor(Loop& loop, std::chrono::milliseconds interval,
                               std::function<void(double)> on_sample)
    : state_(std::make_unique<State>()) {
  state_->last_lag_seconds = &last_lag_seconds_;
  state_->interval_ns = static_cast<std::uint64_t>(interval.count()) * 1'000'000;
  state_->on_sample = std::move(on_sample);
  state_->timer = UvHandle<uv_timer_t>(loop, state_.get(), uv_timer_init, "loop lag timer");
  state_->expected_ns = uv_hrtime() + state_->interval_ns;
  const auto interval_ms = static_cast<std::uint64_t>(interval.count());
  uv_timer_start(
      state_->timer.get(),
      [](uv_timer_t* timer) {
        auto* state = static_cast<State*>(timer->data);
        const std::uint64_t now = uv_hrtime();
        // libuv's timer granularity is a millisecond: lag below that is noise.
        const std::uint64_t lag_ns = now > state->expected_ns ? now - state->expected_ns : 0;
        state->expected_ns = now + state->interval_ns;
        const double lag = static_cast<double>(lag_ns) / 1e9;
        state->last_lag_seconds->store(lag, std::memory_order_relaxed);
        if (state->on_sample) state->on_sample(lag);
      },
      interval_ms, interval_ms);
  // Sampling alone must not keep the loop alive.
  uv_unref(state_->timer.handle());
}

double LoopLagMonitor::last_lag_seconds() const noexcept {
  return last_lag_seconds_.load(std::memory_order_relaxed);
}

void LoopLagMonitor::stop() noexcept {
  // The timer closes (or, after Loop::close(), is freed) with its state; its callback does not
  // run again.
  state_.reset();
  last_lag_seconds_.store(0, std::memory_order_relaxed);
}

LoopLagMonitor::~LoopLagMonitor() = default;

}  // namespace squall

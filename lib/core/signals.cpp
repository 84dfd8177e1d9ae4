#include "squall/core/signals.hpp"

#include "squall/core/uv_handle.hpp"

#include <csignal>
#include <string>
#include <system_error>

namespace squall {

struct SignalWatcher::State {
  UvHandle<uv_signal_t> handle;    // handle.data points here.
  std::function<void()> callback;  // Runs per delivered signal.
};

SignalWatcher::SignalWatcher(Loop& loop, int signal_number, std::function<void()> callback)
    : state_(std::make_unique<State>()) {
  state_->callback = std::move(callback);
  state_->handle = UvHandle<uv_signal_t>(loop, state_.get(), uv_signal_init, "signal watcher");
  const int status = uv_signal_start(
      state_->handle.get(),
      [](uv_signal_t* handle, int) { static_cast<State*>(handle->data)->callback(); },
      signal_number);
  if (status < 0) {
    throw std::system_error(
        -status, std::generic_category(),
        "cannot watch signal " + std::to_string(signal_number) + ": " + uv_strerror(status));
  }
  // A signal watcher alone must not keep the loop running.
  uv_unref(state_->handle.handle());
}

// The handle closes (or, after Loop::close(), is freed) with the state.
SignalWatcher::~SignalWatcher() = default;

void ignore_sigpipe() {
  std::signal(SIGPIPE, SIG_IGN);
}

}  // namespace squall

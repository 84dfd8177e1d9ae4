#include "squall/core/signals.hpp"

#include <csignal>
#include <system_error>

namespace squall {

struct SignalWatcher::State {
  uv_signal_t handle;              // handle.data points here.
  std::function<void()> callback;  // Runs per delivered signal.
};

SignalWatcher::SignalWatcher(Loop& loop, int signal_number, std::function<void()> callback)
    : state_(new State{}) {
  state_->callback = std::move(callback);
  uv_signal_init(loop.uv(), &state_->handle);
  state_->handle.data = state_;
  const int status = uv_signal_start(
      &state_->handle,
      [](uv_signal_t* handle, int) { static_cast<State*>(handle->data)->callback(); },
      signal_number);
  if (status < 0) {
    uv_close(reinterpret_cast<uv_handle_t*>(&state_->handle),
             [](uv_handle_t* handle) { delete static_cast<State*>(handle->data); });
    throw std::system_error(-status, std::generic_category(), "uv_signal_start");
  }
  // A signal watcher alone must not keep the loop running.
  uv_unref(reinterpret_cast<uv_handle_t*>(&state_->handle));
}

SignalWatcher::~SignalWatcher() {
  auto* handle = reinterpret_cast<uv_handle_t*>(&state_->handle);
  if (uv_is_closing(handle)) {
    // Loop teardown closed it already (without a callback): free it here.
    delete state_;
    return;
  }
  uv_close(handle, [](uv_handle_t* closed) { delete static_cast<State*>(closed->data); });
}

void ignore_sigpipe() {
  std::signal(SIGPIPE, SIG_IGN);
}

}  // namespace squall

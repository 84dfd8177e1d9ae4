// Signals delivered on the loop thread through uv_signal_t, never handled in a raw handler.
#pragma once

#include <functional>
#include <memory>

#include <uv.h>

#include "squall/core/loop.hpp"

namespace squall {

class SignalWatcher {
 public:
  // Starts watching `signal_number`; `callback` runs on the loop thread for each delivery.
  SignalWatcher(Loop& loop, int signal_number, std::function<void()> callback);
  ~SignalWatcher();
  SignalWatcher(const SignalWatcher&) = delete;
  SignalWatcher& operator=(const SignalWatcher&) = delete;

 private:
  struct State;
  std::unique_ptr<State> state_;  // The handle and the callback.
};

// SIGPIPE would kill the process on a write to a reset peer: libuv reports EPIPE instead.
void ignore_sigpipe();

}  // namespace squall

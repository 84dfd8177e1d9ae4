// The event loop: one libuv loop, the thread that owns every connection, and the only ways other
// threads and timers reach it (Tornado's IOLoop: add_callback, call_later, run_in_executor).
#pragma once

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <uv.h>

namespace squall {

class Loop {
 public:
  using Callback = std::function<void()>;
  using TimerId = std::uint64_t;

  Loop();
  // Closes every handle still open (running their close callbacks) and closes the loop.
  // Returns uv_loop_close's status: 0, or UV_EBUSY if something kept a handle or request open.
  int close();
  // Calls close() if it was not called; reports a failure on stderr.
  ~Loop();
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  uv_loop_t* uv() noexcept { return &loop_; }

  // Runs callbacks, timers and I/O until stop() is called.
  void run();
  // Makes run() return after the current iteration. Loop thread only.
  void stop() noexcept { uv_stop(&loop_); }

  // Runs `callback` on the loop thread soon. The one entry that is safe from any thread.
  void call_soon(Callback callback);

  // Runs `callback` on the loop thread after `delay`. Loop thread only.
  TimerId call_later(std::chrono::milliseconds delay, Callback callback);
  // Cancels a pending call_later; a no-op once it ran. Returns whether it was pending.
  bool cancel(TimerId id) noexcept;

  // Runs `work` on libuv's thread pool, then `done` on the loop thread with the exception
  // `work` threw (or null). `work` must copy what it needs and never touch loop-owned state.
  void run_blocking(std::function<void()> work, std::function<void(std::exception_ptr)> done);

  // Milliseconds of the loop's cached clock (uv_now).
  std::uint64_t now_ms() const noexcept { return uv_now(&loop_); }

 private:
  struct TimerNode;
  static void on_async(uv_async_t* handle);

  uv_loop_t loop_;                 // The libuv loop itself.
  uv_async_t wakeup_;              // Signalled by call_soon from any thread.
  std::mutex pending_mutex_;       // Guards pending_.
  std::vector<Callback> pending_;  // call_soon callbacks not yet run.
  std::vector<Callback> running_;  // Swapped with pending_ to run outside the lock.
  TimerId next_timer_id_ = 1;      // Ids are never reused.
  std::unordered_map<TimerId, TimerNode*> timers_;  // Pending call_later timers.
  bool closed_ = false;                             // close() ran.
};

}  // namespace squall

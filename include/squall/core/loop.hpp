// The event loop: one libuv loop, the thread that owns every connection, and the only ways other
// threads and timers reach it (Tornado's IOLoop: add_callback, call_later, run_in_executor).
#pragma once

#include <chrono>
#include <coroutine>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include <uv.h>

namespace squall {

namespace detail {

// The call_soon queue, shared by the Loop and every RemoteLoop so that a thread holding a
// RemoteLoop can post safely even while (or after) the Loop closes.
struct CallQueue {
  std::mutex mutex;                          // Guards the fields below.
  std::vector<std::function<void()>> calls;  // call_soon callbacks not yet run.
  uv_async_t* wakeup = nullptr;              // The loop's wake-up handle; null once closed.
};

// A UvHandle's record in its Loop's list of handles (see squall/core/uv_handle.hpp): what
// Loop::close() needs to close it with the UvHandle's own close callback.
struct HandleLink {
  HandleLink* prev = this;               // The list is circular, with the Loop's as its head.
  HandleLink* next = this;               //
  uv_handle_t* handle = nullptr;         // The handle.
  uv_close_cb close_callback = nullptr;  // Frees it, or marks it closed for its owner.
  bool owner_alive = true;               // The UvHandle still holds it.
  bool closed = false;                   // The close callback ran; out of the list.

  HandleLink() = default;
  HandleLink(const HandleLink&) = delete;
  HandleLink& operator=(const HandleLink&) = delete;
  void unlink() noexcept {
    prev->next = next;
    next->prev = prev;
    prev = next = this;
  }
};

// An owner of handles that are not UvHandles (the connections of an HTTP server each hold their
// socket inline, to stay one allocation): Loop::close() runs `run(owner)` before it closes the
// handles still open, so the owner closes its own with their own close callbacks. Unlisted
// before it runs; an owner going away first unlinks it.
struct CloseHook {
  CloseHook* prev = this;  // Circular, with the Loop's as its head; itself when not listed.
  CloseHook* next = this;
  void (*run)(void* owner) noexcept = nullptr;
  void* owner = nullptr;

  CloseHook() = default;
  CloseHook(const CloseHook&) = delete;
  CloseHook& operator=(const CloseHook&) = delete;
  void unlink() noexcept {
    prev->next = next;
    next->prev = prev;
    prev = next = this;
  }
};

// A root coroutine frame on its Loop's list of tasks not yet finished (spawn, coroutine
// handlers): close() destroys those still suspended. Lives in the root frame's promise, so
// adopting a task allocates nothing.
struct TaskLink {
  TaskLink* prev = this;  // Circular, with the Loop's as its head; itself when not listed.
  TaskLink* next = this;
  std::coroutine_handle<> frame;  // The root frame.

  TaskLink() = default;
  TaskLink(const TaskLink&) = delete;
  TaskLink& operator=(const TaskLink&) = delete;
  void unlink() noexcept {
    prev->next = next;
    next->prev = prev;
    prev = next = this;
  }
};

}  // namespace detail

// A handle on a Loop for other threads: call_soon stays safe after the Loop closed or was
// destroyed (it then returns false). Copyable; cheap to keep.
class RemoteLoop {
 public:
  RemoteLoop() = default;
  // Queues `callback` for the loop thread; false (and `callback` dropped) if the loop is closed.
  bool call_soon(std::function<void()> callback) const;

 private:
  friend class Loop;
  explicit RemoteLoop(std::shared_ptr<detail::CallQueue> queue) : queue_(std::move(queue)) {}
  std::shared_ptr<detail::CallQueue> queue_;  // Shared with the Loop.
};

class Loop {
 public:
  using Callback = std::function<void()>;
  using TimerId = std::uint64_t;

  Loop();
  // Destroys the coroutine frames of spawned tasks still suspended (their awaitables stop their
  // timers and requests), drops call_soon callbacks not yet run, closes every handle still open
  // (running their close callbacks) and closes the loop. Returns uv_loop_close's status: 0, or
  // UV_EBUSY if something kept a handle or request open. Loop thread only.
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

  // Runs `callback` on the loop thread soon. The one entry that is safe from any thread, as long
  // as this Loop object exists; a thread that may outlive it posts through remote() instead.
  // Returns false, dropping `callback`, once close() has begun (it never runs then).
  bool call_soon(Callback callback);
  // A handle for other threads whose call_soon is safe even after this Loop is destroyed.
  RemoteLoop remote() const { return RemoteLoop(queue_); }

  // Runs `callback` on the loop thread after `delay`; a zero or negative delay runs it on the
  // next loop iteration. Loop thread only.
  TimerId call_later(std::chrono::milliseconds delay, Callback callback);
  // Runs `callback` every `period` (at least 1 ms) until cancel(id), first one period from now
  // (Tornado's PeriodicCallback). Runs stay on the grid start + k * period: when a run (or
  // anything else on the loop) overruns, the missed runs are skipped, never bunched. A callback
  // that throws is logged and keeps its schedule. Loop thread only.
  TimerId call_every(std::chrono::milliseconds period, Callback callback);
  // Cancels a pending call_later or a call_every; a no-op once a call_later ran. Returns whether
  // it was pending. A call_every may cancel itself from its own callback.
  bool cancel(TimerId id) noexcept;

  // Runs `work` on libuv's thread pool, then `done` on the loop thread with the exception
  // `work` threw (or null). `work` must copy what it needs and never touch loop-owned state.
  void run_blocking(std::function<void()> work, std::function<void(std::exception_ptr)> done);

  // Milliseconds of the loop's cached clock (uv_now).
  std::uint64_t now_ms() const noexcept { return uv_now(&loop_); }

  // Whether close() has begun.
  bool closed() const noexcept { return closed_; }

  // For spawn() and coroutine handlers: the root frame of a detached task, destroyed by close()
  // if still suspended. `link` lives in that frame; release_task is harmless twice.
  void adopt_task(detail::TaskLink& link, std::coroutine_handle<> frame) noexcept {
    link.frame = frame;
    link.next = &tasks_;
    link.prev = tasks_.prev;
    tasks_.prev->next = &link;
    tasks_.prev = &link;
  }
  static void release_task(detail::TaskLink& link) noexcept { link.unlink(); }

  // For an owner of handles of its own: close() runs the hook before closing open handles.
  void adopt_close_hook(detail::CloseHook& hook) noexcept {
    hook.next = &close_hooks_;
    hook.prev = close_hooks_.prev;
    close_hooks_.prev->next = &hook;
    close_hooks_.prev = &hook;
  }

  // For UvHandle: a handle that close() closes with its own close callback if still open.
  void adopt_handle(detail::HandleLink& link) noexcept {
    link.next = &handles_;
    link.prev = handles_.prev;
    handles_.prev->next = &link;
    handles_.prev = &link;
  }

 private:
  struct TimerNode;
  static void on_async(uv_async_t* handle);
  static void on_timer(uv_timer_t* timer);
  TimerId start_timer(std::uint64_t delay_ms, std::uint64_t period_ms, Callback callback);

  uv_loop_t loop_;                            // The libuv loop itself.
  uv_async_t wakeup_;                         // Signalled by call_soon from any thread.
  std::shared_ptr<detail::CallQueue> queue_;  // call_soon's queue; wakeup -> wakeup_.
  std::vector<Callback> running_;             // Swapped with the queue to run unlocked.
  TimerId next_timer_id_ = 1;                 // Ids are never reused.
  std::unordered_map<TimerId, std::unique_ptr<TimerNode>> timers_;  // call_later, call_every.
  detail::TaskLink tasks_;         // Head of the root frames of tasks not yet finished.
  bool closed_ = false;            // close() ran.
  detail::HandleLink handles_;     // Head of the UvHandles not yet closed.
  detail::CloseHook close_hooks_;  // Head of the owners that close their own handles.
};

}  // namespace squall

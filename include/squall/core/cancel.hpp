// Cancellation, one mechanism everywhere: std::stop_token.
//
// Every Task runs under a stop token, inherited from the coroutine that awaits it (spawn() and the
// router give the root one). Every awaitable of lib/core watches the token of the coroutine that
// awaits it: when stop is requested it first stops what it waits on (uv_timer_stop, uv_cancel),
// then resumes its coroutine with CancelledError on a later turn of the loop, never from inside
// request_stop(). when_any and with_timeout own a stop_source linked to the awaiter's token and
// request stop on the operations they no longer need, then wait for them to finish, so no frame
// outlives the combinator that started it.
//
// Threads: request_stop() runs the registered callbacks on the calling thread, and they touch
// libuv handles, so call it on the loop thread (from another thread, through call_soon).
#pragma once

#include <coroutine>
#include <cstddef>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <type_traits>
#include <utility>

namespace squall {

// Thrown at a co_await whose operation was cancelled through the task's stop token.
class CancelledError : public std::runtime_error {
 public:
  explicit CancelledError(const std::string& what) : std::runtime_error(what) {}
};

// Thrown by with_timeout when the deadline passed before the operation finished.
class TimeoutError : public std::runtime_error {
 public:
  explicit TimeoutError(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {

// Coroutine frames: freed frames are kept per thread, by size in steps of 64 bytes up to 1 KiB,
// for the next frame of that size (a request's frames are made and freed on its loop thread, so
// most come from the cache instead of malloc). Larger frames, and every frame in an
// AddressSanitizer build, use operator new and delete directly.
void* allocate_frame(std::size_t size);
void free_frame(void* frame, std::size_t size) noexcept;
// Whether freed frames are kept (false in an AddressSanitizer build).
bool frame_cache_enabled() noexcept;

// What every squall coroutine promise carries: who awaits it and the stop token it runs under.
struct PromiseBase {
  std::coroutine_handle<> continuation;  // Resumed (symmetric transfer) when the body ends.
  std::stop_token stop_token;            // Inherited from the awaiter; awaitables watch it.

  static void* operator new(std::size_t size) { return allocate_frame(size); }
  static void operator delete(void* frame, std::size_t size) noexcept { free_frame(frame, size); }
};

// The stop token of the coroutine behind `handle`, or an empty one for foreign coroutines.
template <typename Promise>
std::stop_token stop_token_of(std::coroutine_handle<Promise> handle) noexcept {
  if constexpr (std::is_base_of_v<PromiseBase, Promise>) {
    return handle.promise().stop_token;
  } else {
    return {};
  }
}

// `co_await current_stop_token()` hands the running task its token without suspending.
struct CurrentStopToken {
  std::stop_token token;  // Filled in await_suspend.
  bool await_ready() const noexcept { return false; }
  template <typename Promise>
  bool await_suspend(std::coroutine_handle<Promise> handle) noexcept {
    token = stop_token_of(handle);
    return false;
  }
  std::stop_token await_resume() noexcept { return std::move(token); }
};

}  // namespace detail

// The stop token of the running task: `auto token = co_await squall::current_stop_token();`.
inline detail::CurrentStopToken current_stop_token() noexcept {
  return {};
}

}  // namespace squall

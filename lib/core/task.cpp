#include "squall/core/task.hpp"

#include <stdexcept>

#include <spdlog/spdlog.h>

#include "core/frame_cache.hpp"
#include "squall/core/loop.hpp"

namespace squall {

namespace detail {
namespace {

#if defined(__SANITIZE_ADDRESS__)
#define SQUALL_FRAME_CACHE 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SQUALL_FRAME_CACHE 0
#endif
#endif
#ifndef SQUALL_FRAME_CACHE
#define SQUALL_FRAME_CACHE 1  // Off under ASan, which must see every frame freed.
#endif

// Trivially destructible, so usable until the thread ends; FrameCacheDrain frees its blocks
// when the thread (or the program) ends, and later frees go straight to operator delete.
thread_local FrameCache frame_cache;

struct FrameCacheDrain {
  FrameCacheDrain() = default;
  FrameCacheDrain(const FrameCacheDrain&) = delete;
  FrameCacheDrain& operator=(const FrameCacheDrain&) = delete;
  ~FrameCacheDrain() { frame_cache.drain(); }
};
thread_local FrameCacheDrain frame_cache_drain;

}  // namespace

bool frame_cache_enabled() noexcept {
  return SQUALL_FRAME_CACHE != 0;
}

void* allocate_frame(std::size_t size) {
  if (!SQUALL_FRAME_CACHE) return ::operator new(size);
  return frame_cache.allocate(size);
}

void free_frame(void* frame, std::size_t size) noexcept {
  if (!SQUALL_FRAME_CACHE) {
    ::operator delete(frame);
    return;
  }
  // The first block kept on a thread registers the drain at that thread's end.
  if (frame_cache.free(frame, size) == FrameCache::Freed::kept_first) {
    static_cast<void>(&frame_cache_drain);
  }
}

}  // namespace detail

namespace {

// The root frame of a spawned task: registered with its Loop while it lives, freed at its end.
struct Detached {
  struct promise_type : detail::PromiseBase {
    detail::TaskLink link;  // On its Loop's list of tasks.

    Detached get_return_object() noexcept {
      return Detached{std::coroutine_handle<promise_type>::from_promise(*this)};
    }
    std::suspend_always initial_suspend() const noexcept { return {}; }
    struct Release {
      bool await_ready() const noexcept { return false; }
      void await_suspend(std::coroutine_handle<promise_type> frame) const noexcept {
        Loop::release_task(frame.promise().link);
        frame.destroy();
      }
      void await_resume() const noexcept {}
    };
    Release final_suspend() const noexcept { return {}; }
    void return_void() const noexcept {}
    // The body catches everything; nothing can arrive here.
    void unhandled_exception() const noexcept { std::terminate(); }
  };
  std::coroutine_handle<promise_type> frame;  // Owned by itself once started.
};

void log_outcome(std::exception_ptr error) {
  if (!error) return;
  try {
    std::rethrow_exception(error);
  } catch (const CancelledError& cancelled) {
    spdlog::debug("spawned task cancelled: {}", cancelled.what());
  } catch (const std::exception& failure) {
    spdlog::error("spawned task failed: {}", failure.what());
  } catch (...) {
    spdlog::error("spawned task failed with an exception that is not a std::exception");
  }
}

Detached run_detached(Task<void> task, std::function<void(std::exception_ptr)> done) {
  std::exception_ptr error;
  try {
    co_await std::move(task);
  } catch (...) {
    error = std::current_exception();
  }
  try {
    if (done) {
      done(error);
    } else {
      log_outcome(error);
    }
  } catch (const std::exception& failure) {
    spdlog::error("completion of a spawned task threw: {}", failure.what());
  } catch (...) {
    spdlog::error("completion of a spawned task threw an exception that is not a std::exception");
  }
}

}  // namespace

void spawn(Loop& loop, Task<void> task, std::stop_token token) {
  spawn(loop, std::move(task), std::move(token), nullptr);
}

void spawn(Loop& loop, Task<void> task, std::stop_token token,
           std::function<void(std::exception_ptr)> done) {
  if (loop.closed()) throw std::logic_error("squall::spawn: the loop is closed");
  const Detached root = run_detached(std::move(task), std::move(done));
  root.frame.promise().stop_token = std::move(token);
  loop.adopt_task(root.frame.promise().link, root.frame);
  detail::resume(root.frame);
}

}  // namespace squall

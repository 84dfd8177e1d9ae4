// Task<T>: the coroutine type of squall, Tornado's coroutines in C++20.
//
//   squall::Task<int> answer(squall::Loop& loop) {
//     co_await squall::sleep(loop, 250ms);
//     co_return 42;
//   }
//
// A Task is lazy (its body starts when it is awaited or spawned), move-only, and owns its frame.
// An exception thrown in the body is rethrown at the co_await. Awaiting a Task transfers control
// symmetrically (await_suspend returns a handle), so chains of any depth run in constant stack.
// Tasks run on the loop thread: every awaitable of lib/core resumes its coroutine from a libuv
// callback of the loop that started it.
//
// Parameters: take them by value. A coroutine's reference parameter that is bound to a temporary
// dangles at the first suspension, and so do the captures of a lambda that is a coroutine
// (C++ Core Guidelines CP.51, CP.53): write a named function, or a lambda without captures.
#pragma once

#include <coroutine>
#include <exception>
#include <functional>
#include <iterator>
#include <stop_token>
#include <type_traits>
#include <utility>
#include <variant>

#include "squall/core/cancel.hpp"

namespace squall {

class Loop;
template <typename T = void>
class Task;

namespace detail {

// Symmetric transfer in constant stack whatever the compiler does. Returning a handle from
// await_suspend only avoids a nested call if the compiler emits a tail call, which g++ does not
// do at -O0 or under AddressSanitizer. So every resume that comes from outside a task (a libuv
// callback, spawn, when_all starting its children) goes through resume(), a trampoline, and a
// transfer made inside it pushes the next frame here and returns noop_coroutine(): control goes
// back to the trampoline's loop, which resumes that frame. Outside any trampoline (a foreign
// awaitable resuming a Task frame directly), the handle is returned for a plain symmetric
// transfer. Loop thread only, like everything about tasks.
struct Trampoline {
  std::coroutine_handle<> ready[8];  // Frames to resume, a stack; rarely more than one.
  int count = 0;                     // How many of `ready` are set.
  int depth = 0;                     // Nested resume() calls running.
};
inline thread_local Trampoline trampoline;

// Hands control to `next`: through the running trampoline when there is one.
inline std::coroutine_handle<> transfer_to(std::coroutine_handle<> next) noexcept {
  Trampoline& t = trampoline;
  if (t.depth == 0 || t.count == static_cast<int>(std::size(t.ready))) return next;
  t.ready[t.count++] = next;
  return std::noop_coroutine();
}

// Resumes `frame` and every frame it transfers to, until all of them are suspended.
inline void resume(std::coroutine_handle<> frame) {
  Trampoline& t = trampoline;
  const int base = t.count;
  ++t.depth;
  frame.resume();
  while (t.count > base) t.ready[--t.count].resume();
  --t.depth;
}

// Resumes whoever awaits the finished coroutine; nothing when no one does.
struct FinalAwaiter {
  bool await_ready() const noexcept { return false; }
  template <typename Promise>
  std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> finished) noexcept {
    const std::coroutine_handle<> next = finished.promise().continuation;
    return next ? transfer_to(next) : std::noop_coroutine();
  }
  void await_resume() const noexcept {}
};

template <typename T>
class TaskPromise : public PromiseBase {
 public:
  Task<T> get_return_object() noexcept;
  std::suspend_always initial_suspend() const noexcept { return {}; }
  FinalAwaiter final_suspend() const noexcept { return {}; }
  template <typename U>
  requires std::is_convertible_v<U&&, T>
  void return_value(U&& value) { result_.template emplace<1>(std::forward<U>(value)); }
  void unhandled_exception() noexcept { result_.template emplace<2>(std::current_exception()); }
  // The value, or the body's exception rethrown. Once, after the body ended.
  T take() {
    if (result_.index() == 2) std::rethrow_exception(std::get<2>(result_));
    return std::move(std::get<1>(result_));
  }

 private:
  std::variant<std::monostate, T, std::exception_ptr> result_;  // Empty, value, or exception.
};

template <>
class TaskPromise<void> : public PromiseBase {
 public:
  Task<void> get_return_object() noexcept;
  std::suspend_always initial_suspend() const noexcept { return {}; }
  FinalAwaiter final_suspend() const noexcept { return {}; }
  void return_void() noexcept {}
  void unhandled_exception() noexcept { error_ = std::current_exception(); }
  void take() {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::exception_ptr error_;  // What the body threw, if anything.
};

}  // namespace detail

template <typename T>
class [[nodiscard]] Task {
 public:
  using promise_type = detail::TaskPromise<T>;
  using value_type = T;

  Task() noexcept = default;
  explicit Task(std::coroutine_handle<promise_type> frame) noexcept : frame_(frame) {}
  Task(Task&& other) noexcept : frame_(std::exchange(other.frame_, {})) {}
  Task& operator=(Task&& other) noexcept {
    if (this != &other) {
      if (frame_) frame_.destroy();
      frame_ = std::exchange(other.frame_, {});
    }
    return *this;
  }
  Task(const Task&) = delete;
  Task& operator=(const Task&) = delete;
  // Destroys the frame: a task never started is simply dropped.
  ~Task() {
    if (frame_) frame_.destroy();
  }

  // False for a moved-from or default-constructed Task.
  bool valid() const noexcept { return static_cast<bool>(frame_); }

  struct Awaiter {
    std::coroutine_handle<promise_type> task;  // The awaited frame, owned by the Task.
    bool await_ready() const noexcept { return false; }
    template <typename Promise>
    std::coroutine_handle<> await_suspend(std::coroutine_handle<Promise> awaiting) noexcept {
      task.promise().continuation = awaiting;
      task.promise().stop_token = detail::stop_token_of(awaiting);
      return detail::transfer_to(task);
    }
    T await_resume() { return task.promise().take(); }
  };

  // `co_await std::move(task)` or `co_await make_task()`: starts the body and waits for it.
  Awaiter operator co_await() && noexcept { return Awaiter{frame_}; }

 private:
  std::coroutine_handle<promise_type> frame_;  // Owned.
};

namespace detail {

template <typename T>
Task<T> TaskPromise<T>::get_return_object() noexcept {
  return Task<T>(std::coroutine_handle<TaskPromise<T>>::from_promise(*this));
}

inline Task<void> TaskPromise<void>::get_return_object() noexcept {
  return Task<void>(std::coroutine_handle<TaskPromise<void>>::from_promise(*this));
}

}  // namespace detail

// Runs `task` detached on `loop` (Tornado's spawn_callback), under `token`. The body starts now,
// on the calling thread, which must be the loop thread, and runs until its first suspension. An
// exception that escapes it is logged (a CancelledError at debug level), never rethrown; the
// process goes on. A task still suspended when the loop closes is destroyed by Loop::close().
void spawn(Loop& loop, Task<void> task, std::stop_token token = {});

// As above; `done` runs when the task ends, with what it threw (null when it returned), instead
// of the logging. It may run before spawn returns when the body never suspends.
void spawn(Loop& loop, Task<void> task, std::stop_token token,
           std::function<void(std::exception_ptr)> done);

}  // namespace squall

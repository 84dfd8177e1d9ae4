// What a Task awaits on the loop: sleep, run_blocking (typed pool work), when_all, when_any and
// with_timeout. Each one watches the awaiting task's stop token (see core/cancel.hpp): on a stop
// request it stops what it waits on first, then resumes with CancelledError.
#pragma once

#include <array>
#include <chrono>
#include <coroutine>
#include <cstddef>
#include <exception>
#include <functional>
#include <optional>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <uv.h>

#include "squall/core/cancel.hpp"
#include "squall/core/loop.hpp"
#include "squall/core/task.hpp"
#include "squall/core/uv_handle.hpp"

namespace squall {

// ---- sleep ------------------------------------------------------------------------------------

// `co_await sleep(loop, 250ms)`: resumes after `delay` (zero or negative: on the next loop
// iteration), or at once with CancelledError when the task's stop token fires.
class [[nodiscard]] Sleep {
 public:
  Sleep(Loop& loop, std::chrono::milliseconds delay) noexcept : loop_(&loop), delay_(delay) {}
  // Only an awaitable not yet awaited moves (into with_timeout, when_all, ...).
  Sleep(Sleep&& other) noexcept : loop_(other.loop_), delay_(other.delay_) {}
  Sleep& operator=(Sleep&&) = delete;
  ~Sleep();

  bool await_ready() const noexcept { return false; }
  template <typename Promise>
  bool await_suspend(std::coroutine_handle<Promise> waiter) {
    return start(waiter, detail::stop_token_of(waiter));
  }
  void await_resume();

 private:
  struct OnStop {
    Sleep* self;
    void operator()() const noexcept;
  };
  bool start(std::coroutine_handle<> waiter, std::stop_token token);
  static void on_timer(uv_timer_t* timer);

  Loop* loop_;                                         // Whose timer.
  std::chrono::milliseconds delay_;                    // How long.
  UvHandle<uv_timer_t> timer_;                         // Made when first awaited; data -> this.
  std::coroutine_handle<> waiter_;                     // Resumed when the timer fires.
  bool cancelled_ = false;                             // Stop was requested before the timer fired.
  std::optional<std::stop_callback<OnStop>> on_stop_;  // Registered while suspended.
};

inline Sleep sleep(Loop& loop, std::chrono::milliseconds delay) noexcept {
  return Sleep(loop, delay);
}

// ---- run_blocking -----------------------------------------------------------------------------

namespace detail {

// A uv_work_t and its outcome. Shared by the awaitable and libuv until both let go: the
// after-work callback frees it when the awaitable is gone, the awaitable otherwise.
struct WorkNode {
  uv_work_t request;               // request.data -> this.
  std::coroutine_handle<> waiter;  // Resumed by the after-work callback; null once detached.
  std::exception_ptr error;        // What the work threw (set on the pool thread).
  int status = 0;                  // The after-work status (UV_ECANCELED when cancelled).
  bool finished = false;           // The after-work callback ran.
  bool abandoned = false;          // The awaitable is gone: the callback frees the node.
  virtual ~WorkNode() = default;
  virtual void run() noexcept = 0;  // On a pool thread.
};

template <typename Fn, typename Result>
struct TypedWorkNode final : WorkNode {
  explicit TypedWorkNode(Fn work) : work(std::move(work)) {}
  void run() noexcept override {
    try {
      if constexpr (std::is_void_v<Result>) {
        work();
      } else {
        result.emplace(work());
      }
    } catch (...) {
      error = std::current_exception();
    }
  }
  Fn work;  // Moved in; runs on the pool.
  std::optional<std::conditional_t<std::is_void_v<Result>, char, Result>> result;  // Its value.
};

// The untyped half of the run_blocking awaitable (core/awaitables.cpp).
class BlockingOperation {
 public:
  BlockingOperation(Loop& loop, WorkNode* node) noexcept : loop_(&loop), node_(node) {}
  BlockingOperation(BlockingOperation&& other) noexcept
      : loop_(other.loop_), node_(std::exchange(other.node_, nullptr)) {}
  BlockingOperation& operator=(BlockingOperation&&) = delete;
  ~BlockingOperation();

 protected:
  struct OnStop {
    BlockingOperation* self;
    void operator()() const noexcept;
  };
  bool start(std::coroutine_handle<> waiter, std::stop_token token);
  // Throws CancelledError or the work's exception; otherwise the node holds the result.
  void check_outcome();

  Loop* loop_;                                         // Whose pool.
  WorkNode* node_;                                     // See WorkNode for who frees it.
  std::coroutine_handle<> waiter_;                     // The awaiting coroutine.
  bool started_ = false;                               // uv_queue_work succeeded.
  bool cancelled_ = false;                             // Stop was requested while waiting.
  std::optional<std::stop_callback<OnStop>> on_stop_;  // Registered while suspended.
};

}  // namespace detail

// `T value = co_await run_blocking(loop, fn)`: runs `fn()` on libuv's thread pool and gives its
// result, or rethrows its exception, back on the loop thread. `fn` is moved in: it must own what
// it uses and never touch loop-owned objects. On cancellation, work not started yet is
// uv_cancel'ed and the task resumes with CancelledError; work already running cannot be
// interrupted: the task resumes at once with CancelledError and the result is dropped when the
// work ends.
template <typename Fn>
class [[nodiscard]] Blocking : public detail::BlockingOperation {
 public:
  using Result = std::invoke_result_t<Fn&>;
  Blocking(Loop& loop, Fn work)
      : detail::BlockingOperation(loop, new detail::TypedWorkNode<Fn, Result>(std::move(work))) {}
  Blocking(Blocking&&) noexcept = default;

  bool await_ready() const noexcept { return false; }
  template <typename Promise>
  bool await_suspend(std::coroutine_handle<Promise> waiter) {
    return start(waiter, detail::stop_token_of(waiter));
  }
  Result await_resume() {
    check_outcome();
    if constexpr (!std::is_void_v<Result>) {
      return std::move(*static_cast<detail::TypedWorkNode<Fn, Result>*>(node_)->result);
    }
  }
};

template <typename Fn>
Blocking<std::decay_t<Fn>> run_blocking(Loop& loop, Fn&& work) {
  return Blocking<std::decay_t<Fn>>(loop, std::forward<Fn>(work));
}

// ---- combinators ------------------------------------------------------------------------------

namespace detail {

template <typename T>
using ValueOrMonostate = std::conditional_t<std::is_void_v<T>, std::monostate, T>;

template <typename A>
struct AwaitResult {
  using type = decltype(std::declval<A&>().await_resume());
};
template <typename T>
struct AwaitResult<Task<T>> {
  using type = T;
};
template <typename A>
using AwaitResultT = typename AwaitResult<A>::type;

// Any awaitable as a Task (a Task stays itself).
template <typename T>
Task<T> to_task(Task<T> task) {
  return task;
}
template <typename A>
Task<AwaitResultT<A>> awaitable_task(A awaitable) {
  if constexpr (std::is_void_v<AwaitResultT<A>>) {
    co_await awaitable;
  } else {
    co_return co_await awaitable;
  }
}
template <typename A>
Task<AwaitResultT<A>> to_task(A awaitable) {
  return awaitable_task<A>(std::move(awaitable));
}

// Children started together under one stop source, linked to the awaiting task's token.
struct Group {
  struct StopChildren {
    Group* group;
    void operator()() const noexcept { group->source.request_stop(); }
  };
  std::stop_source source;                               // The children's token.
  std::optional<std::stop_callback<StopChildren>> link;  // Parent's stop -> source.
  std::coroutine_handle<> waiter;                        // Resumed when the last child ends.
  std::size_t remaining = 0;                             // Children still running (+1 at start).
  std::exception_ptr first_error;                        // when_all: the first failure.
  std::size_t winner = static_cast<std::size_t>(-1);     // when_any: the first to end.
  bool first_wins = false;                               // when_any rather than when_all.

  void child_done(std::size_t index, std::exception_ptr error) noexcept {
    if (first_wins) {
      if (winner != static_cast<std::size_t>(-1)) return;
      winner = index;
      first_error = std::move(error);
      source.request_stop();
    } else if (error && !first_error) {
      first_error = std::move(error);
      source.request_stop();
    }
  }
};

// The coroutine that runs one child and reports to the Group; owned by the combinator's frame.
class Child {
 public:
  struct promise_type : PromiseBase {
    Group* group = nullptr;  // Set before the first resume.
    Child get_return_object() noexcept {
      return Child(std::coroutine_handle<promise_type>::from_promise(*this));
    }
    std::suspend_always initial_suspend() const noexcept { return {}; }
    struct Report {
      bool await_ready() const noexcept { return false; }
      std::coroutine_handle<> await_suspend(std::coroutine_handle<promise_type> frame) noexcept {
        Group* group = frame.promise().group;
        if (--group->remaining == 0) return transfer_to(group->waiter);
        return std::noop_coroutine();
      }
      void await_resume() const noexcept {}
    };
    Report final_suspend() const noexcept { return {}; }
    void return_void() const noexcept {}
    void unhandled_exception() const noexcept { std::terminate(); }  // The body catches all.
  };
  Child() noexcept = default;
  explicit Child(std::coroutine_handle<promise_type> frame) noexcept : frame_(frame) {}
  Child(Child&& other) noexcept : frame_(std::exchange(other.frame_, {})) {}
  Child& operator=(Child&& other) noexcept {
    std::swap(frame_, other.frame_);
    return *this;
  }
  ~Child() {
    if (frame_) frame_.destroy();
  }
  std::coroutine_handle<promise_type> frame() const noexcept { return frame_; }

 private:
  std::coroutine_handle<promise_type> frame_;  // Owned.
};

template <typename T>
Child run_child(Task<T> task, Group* group, std::size_t index,
                std::optional<ValueOrMonostate<T>>* out) {
  std::exception_ptr error;
  try {
    if constexpr (std::is_void_v<T>) {
      co_await std::move(task);
      out->emplace();
    } else {
      T value = co_await std::move(task);
      out->emplace(std::move(value));
    }
  } catch (...) {
    error = std::current_exception();
  }
  group->child_done(index, std::move(error));
}

// Starts every child and suspends the combinator until all of them ended.
struct StartGroup {
  Group* group;     // Lives in the combinator's frame.
  Child* children;  // The same.
  std::size_t count;
  bool await_ready() const noexcept { return false; }
  template <typename Promise>
  bool await_suspend(std::coroutine_handle<Promise> waiter) {
    group->waiter = waiter;
    group->remaining = count + 1;  // A child ending during the loop below cannot resume us.
    group->link.emplace(stop_token_of(waiter), Group::StopChildren{group});
    for (std::size_t i = 0; i < count; ++i) {
      children[i].frame().promise().group = group;
      children[i].frame().promise().stop_token = group->source.get_token();
      resume(children[i].frame());
    }
    return --group->remaining != 0;
  }
  void await_resume() noexcept { group->link.reset(); }
};

template <typename... Ts, std::size_t... I>
std::array<Child, sizeof...(Ts)> make_children(
    Group& group, std::tuple<std::optional<ValueOrMonostate<Ts>>...>& out,
    std::index_sequence<I...>, Task<Ts>... tasks) {
  return {run_child<Ts>(std::move(tasks), &group, I, &std::get<I>(out))...};
}

template <typename... Ts>
Task<std::tuple<ValueOrMonostate<Ts>...>> when_all_tasks(Task<Ts>... tasks) {
  Group group;
  std::tuple<std::optional<ValueOrMonostate<Ts>>...> results;
  std::array<Child, sizeof...(Ts)> children =
      make_children<Ts...>(group, results, std::index_sequence_for<Ts...>{}, std::move(tasks)...);
  co_await StartGroup{&group, children.data(), children.size()};
  if (group.first_error) std::rethrow_exception(group.first_error);
  std::tuple<ValueOrMonostate<Ts>...> values = std::apply(
      [](auto&... slot) { return std::tuple<ValueOrMonostate<Ts>...>(std::move(*slot)...); },
      results);
  co_return std::move(values);
}

template <typename Variant, std::size_t I, typename Slots>
Variant take_winner(Slots& slots, std::size_t winner) {
  if constexpr (I + 1 < std::tuple_size_v<Slots>) {
    if (winner != I) return take_winner<Variant, I + 1>(slots, winner);
  }
  return Variant(std::in_place_index<I>, std::move(*std::get<I>(slots)));
}

template <typename... Ts>
Task<std::variant<ValueOrMonostate<Ts>...>> when_any_tasks(Task<Ts>... tasks) {
  Group group;
  group.first_wins = true;
  std::tuple<std::optional<ValueOrMonostate<Ts>>...> results;
  std::array<Child, sizeof...(Ts)> children =
      make_children<Ts...>(group, results, std::index_sequence_for<Ts...>{}, std::move(tasks)...);
  co_await StartGroup{&group, children.data(), children.size()};
  if (group.first_error) std::rethrow_exception(group.first_error);
  co_return take_winner<std::variant<ValueOrMonostate<Ts>...>, 0>(results, group.winner);
}

}  // namespace detail

// `auto [a, b] = co_await when_all(task_a(), run_blocking(loop, f));`: runs every awaitable at
// once and gives their results in order (std::monostate for a void one). When one fails, the
// others are cancelled, and once all have ended its exception is rethrown (Tornado's gen.multi,
// with structured cancellation).
template <typename... As>
requires(sizeof...(As) > 0) auto when_all(As... awaitables) {
  return detail::when_all_tasks(detail::to_task(std::move(awaitables))...);
}

// The same over a vector of tasks of one type: their results in order.
template <typename T>
Task<std::vector<detail::ValueOrMonostate<T>>> when_all(std::vector<Task<T>> tasks) {
  detail::Group group;
  std::vector<std::optional<detail::ValueOrMonostate<T>>> results(tasks.size());
  std::vector<detail::Child> children;
  children.reserve(tasks.size());
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    children.push_back(detail::run_child<T>(std::move(tasks[i]), &group, i, &results[i]));
  }
  co_await detail::StartGroup{&group, children.data(), children.size()};
  if (group.first_error) std::rethrow_exception(group.first_error);
  std::vector<detail::ValueOrMonostate<T>> values;
  values.reserve(results.size());
  for (auto& slot : results) values.push_back(std::move(*slot));
  co_return std::move(values);
}

// `auto first = co_await when_any(a(), b());`: the result of whichever ends first, as a variant
// whose index() says which (its exception rethrown if it failed). The others are cancelled and
// awaited before when_any returns.
template <typename... As>
requires(sizeof...(As) > 0) auto when_any(As... awaitables) {
  return detail::when_any_tasks(detail::to_task(std::move(awaitables))...);
}

// The same over a vector of tasks of one type: {index of the first to end, its result}. An empty
// vector throws std::invalid_argument at the co_await.
template <typename T>
Task<std::pair<std::size_t, detail::ValueOrMonostate<T>>> when_any(std::vector<Task<T>> tasks) {
  if (tasks.empty()) throw std::invalid_argument("squall::when_any: no tasks to wait for");
  detail::Group group;
  group.first_wins = true;
  std::vector<std::optional<detail::ValueOrMonostate<T>>> results(tasks.size());
  std::vector<detail::Child> children;
  children.reserve(tasks.size());
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    children.push_back(detail::run_child<T>(std::move(tasks[i]), &group, i, &results[i]));
  }
  co_await detail::StartGroup{&group, children.data(), children.size()};
  if (group.first_error) std::rethrow_exception(group.first_error);
  std::pair<std::size_t, detail::ValueOrMonostate<T>> first(group.winner,
                                                            std::move(*results[group.winner]));
  co_return std::move(first);
}

namespace detail {

Task<void> sleep_task(Loop& loop, std::chrono::milliseconds delay);
[[noreturn]] void throw_timeout(std::chrono::milliseconds timeout);

template <typename T>
Task<T> with_timeout_task(Loop& loop, std::chrono::milliseconds timeout, Task<T> operation) {
  Task<void> timer = sleep_task(loop, timeout);
  Task<std::variant<ValueOrMonostate<T>, std::monostate>> race =
      when_any_tasks(std::move(operation), std::move(timer));
  std::variant<ValueOrMonostate<T>, std::monostate> outcome = co_await std::move(race);
  if (outcome.index() == 1) throw_timeout(timeout);
  if constexpr (!std::is_void_v<T>) co_return std::move(std::get<0>(outcome));
}

}  // namespace detail

// `co_await with_timeout(loop, 2s, fetch())`: the result of the awaitable, or TimeoutError
// ("squall::with_timeout: timed out after 2000 ms") once `timeout` passes; the operation is then
// cancelled through its stop token and awaited before the error is thrown.
template <typename A>
Task<detail::AwaitResultT<A>> with_timeout(Loop& loop, std::chrono::milliseconds timeout,
                                           A awaitable) {
  return detail::with_timeout_task(loop, timeout, detail::to_task(std::move(awaitable)));
}

}  // namespace squall

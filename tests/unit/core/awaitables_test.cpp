// sleep, run_blocking, when_all, when_any, with_timeout and cancellation through stop tokens.
#include "squall/core/awaitables.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <stop_token>
#include <string>
#include <thread>
#include <vector>

#include "core_test_support.hpp"
#include "squall/core/loop.hpp"

using namespace squall;
using namespace std::chrono_literals;
using squall::testing::elapsed_ms;
using squall::testing::run_task;

namespace {

Task<int> sleep_then(Loop& loop, std::chrono::milliseconds delay, int value) {
  co_await sleep(loop, delay);
  co_return value;
}

// Sleeps; records whether it was cancelled.
Task<void> sleep_watching(Loop& loop, std::chrono::milliseconds delay, bool* cancelled) {
  try {
    co_await sleep(loop, delay);
  } catch (const CancelledError&) {
    *cancelled = true;
    throw;
  }
}

Task<int> fail_after(Loop& loop, std::chrono::milliseconds delay, std::string message) {
  co_await sleep(loop, delay);
  throw std::runtime_error(message);
}

std::string describe(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& caught) {
    return caught.what();
  }
}

// Blocks pool threads until released, so that work queued after them has not started.
struct PoolBlocker {
  std::atomic<bool> release{false};
  std::atomic<int> running{0};
  void block(Loop& loop, int count) {
    for (int i = 0; i < count; ++i) {
      loop.run_blocking(
          [this] {
            ++running;
            while (!release) std::this_thread::sleep_for(1ms);
          },
          [](std::exception_ptr) {});
    }
  }
};

Task<std::string> run_typed(Loop& loop, std::thread::id* pool_thread) {
  std::string text = co_await run_blocking(loop, [pool_thread] {
    *pool_thread = std::this_thread::get_id();
    return std::string("computed on the pool");
  });
  co_return text;
}

Task<int> run_throwing(Loop& loop) {
  int value =
      co_await run_blocking(loop, []() -> int { throw std::invalid_argument("bad input"); });
  co_return value;
}

Task<void> cancel_after(Loop& loop, std::chrono::milliseconds delay, std::stop_source* source) {
  co_await sleep(loop, delay);
  source->request_stop();
}

}  // namespace

TEST_CASE("sleep resumes after its delay, a zero or negative one on the next iteration") {
  Loop loop;
  // libuv counts a timer from the loop's cached time (uv_now), which may be older than a clock
  // read here: the delay has passed when the precise clock reaches that time plus 60 ms.
  const std::uint64_t loop_start_ms = loop.now_ms();
  CHECK(run_task(loop, sleep_then(loop, 60ms, 7)) == 7);
  CHECK(uv_hrtime() / 1'000'000 >= loop_start_ms + 60);
  CHECK(run_task(loop, sleep_then(loop, 0ms, 1)) == 1);
  CHECK(run_task(loop, sleep_then(loop, -5ms, 2)) == 2);
  CHECK(loop.close() == 0);
}

TEST_CASE("a cancelled sleep resumes at once with CancelledError") {
  Loop loop;
  std::stop_source source;
  bool cancelled = false;
  loop.call_later(20ms, [&] { source.request_stop(); });
  const std::uint64_t start = uv_hrtime();
  CHECK_THROWS_AS(run_task(loop, sleep_watching(loop, 10s, &cancelled), source.get_token()),
                  CancelledError);
  CHECK(cancelled);
  CHECK(elapsed_ms(start) < 2000);
  // A token already stopped: the sleep does not even start.
  CHECK_THROWS_AS(run_task(loop, sleep_then(loop, 10s, 0), source.get_token()), CancelledError);
  CHECK(loop.close() == 0);
}

TEST_CASE("run_blocking gives the typed result of work done on a pool thread") {
  Loop loop;
  std::thread::id pool_thread;
  CHECK(run_task(loop, run_typed(loop, &pool_thread)) == "computed on the pool");
  CHECK(pool_thread != std::thread::id());
  CHECK(pool_thread != std::this_thread::get_id());
  CHECK(loop.close() == 0);
}

TEST_CASE("run_blocking rethrows the work's exception at the co_await") {
  Loop loop;
  CHECK_THROWS_WITH_AS(run_task(loop, run_throwing(loop)), "bad input", std::invalid_argument);
  CHECK(loop.close() == 0);
}

TEST_CASE("cancelling run_blocking before the work starts uv_cancels it") {
  Loop loop;
  PoolBlocker blocker;
  // More blockers than pool threads (UV_THREADPOOL_SIZE, 4 by default): the work below waits in
  // the queue behind them.
  const char* pool_size = std::getenv("UV_THREADPOOL_SIZE");
  blocker.block(loop, std::max(4, pool_size != nullptr ? std::atoi(pool_size) : 0) + 4);
  std::atomic<bool> work_ran{false};
  std::stop_source source;
  spawn(loop, cancel_after(loop, 30ms, &source));
  const std::uint64_t start = uv_hrtime();
  std::string outcome;
  try {
    run_task(
        loop,
        [](Loop& l, std::atomic<bool>* ran) -> Task<void> {
          co_await run_blocking(l, [ran] { *ran = true; });
        }(loop, &work_ran),
        source.get_token());
  } catch (const CancelledError& error) {
    outcome = error.what();
  }
  blocker.release = true;
  CHECK(outcome == "squall::run_blocking: cancelled");
  CHECK(elapsed_ms(start) < 2000);
  CHECK(blocker.running > 0);
  CHECK(loop.close() == 0);  // Waits for the blockers; the cancelled work never ran.
  CHECK_FALSE(work_ran);
}

TEST_CASE("cancelling run_blocking while the work runs resumes at once; the work finishes") {
  Loop loop;
  std::atomic<bool> started{false};
  std::atomic<bool> release{false};
  std::atomic<bool> finished{false};
  std::stop_source source;
  loop.call_every(5ms, [&] {
    if (started) source.request_stop();
  });
  CHECK_THROWS_AS(run_task(
                      loop,
                      [](Loop& l, std::atomic<bool>* s, std::atomic<bool>* r,
                         std::atomic<bool>* f) -> Task<void> {
                        int value = co_await run_blocking(l, [s, r, f] {
                          *s = true;
                          while (!*r) std::this_thread::sleep_for(1ms);
                          *f = true;
                          return 1;
                        });
                        (void)value;
                      }(loop, &started, &release, &finished),
                      source.get_token()),
                  CancelledError);
  CHECK_FALSE(finished);
  release = true;
  CHECK(loop.close() == 0);  // Waits for the work; its node is freed by the after-work callback.
  CHECK(finished);
}

TEST_CASE("when_all runs awaitables at once and gives their results in order") {
  Loop loop;
  const std::uint64_t start = uv_hrtime();
  const std::uint64_t loop_start_ms = loop.now_ms();  // What libuv counts the timers from.
  auto [a, b, c] = run_task(loop, when_all(sleep_then(loop, 100ms, 1), sleep_then(loop, 250ms, 2),
                                           run_blocking(loop, [] { return std::string("x"); })));
  const double took = elapsed_ms(start);
  CHECK(a == 1);
  CHECK(b == 2);
  CHECK(c == "x");
  CHECK(uv_hrtime() / 1'000'000 >= loop_start_ms + 250);
  CHECK(took < 345);  // Near the slower one, not the sum (350 ms).

  std::vector<Task<int>> tasks;
  for (int i = 0; i < 5; ++i)
    tasks.push_back(sleep_then(loop, std::chrono::milliseconds(50 - i), i));
  CHECK(run_task(loop, when_all(std::move(tasks))) == std::vector<int>{0, 1, 2, 3, 4});
  CHECK(loop.close() == 0);
}

TEST_CASE("when_all rethrows the first failure after cancelling the others") {
  Loop loop;
  bool cancelled = false;
  const std::uint64_t start = uv_hrtime();
  std::exception_ptr error;
  try {
    run_task(loop, when_all(fail_after(loop, 10ms, "first failure"),
                            sleep_watching(loop, 10s, &cancelled)));
  } catch (...) {
    error = std::current_exception();
  }
  REQUIRE(error);
  CHECK(describe(error) == "first failure");
  CHECK(cancelled);
  CHECK(elapsed_ms(start) < 2000);
  CHECK(loop.close() == 0);
}

TEST_CASE("when_any gives the first result and cancels the others") {
  Loop loop;
  bool slow_cancelled = false;
  const std::uint64_t start = uv_hrtime();
  auto first = run_task(
      loop, when_any(sleep_watching(loop, 10s, &slow_cancelled), sleep_then(loop, 30ms, 5)));
  CHECK(first.index() == 1);
  CHECK(std::get<1>(first) == 5);
  CHECK(slow_cancelled);
  CHECK(elapsed_ms(start) < 2000);

  std::vector<Task<int>> tasks;
  tasks.push_back(sleep_then(loop, 5s, 0));
  tasks.push_back(sleep_then(loop, 10ms, 1));
  const auto [index, value] = run_task(loop, when_any(std::move(tasks)));
  CHECK(index == 1);
  CHECK(value == 1);
  CHECK_THROWS_AS(run_task(loop, when_any(std::vector<Task<int>>())), std::invalid_argument);
  CHECK(run_task(loop, when_all(std::vector<Task<int>>())).empty());
  CHECK(loop.close() == 0);
}

TEST_CASE("with_timeout fails with TimeoutError and cancels the operation") {
  Loop loop;
  bool cancelled = false;
  const std::uint64_t start = uv_hrtime();
  const std::uint64_t loop_start_ms = loop.now_ms();  // What libuv counts the timer from.
  CHECK_THROWS_WITH_AS(
      run_task(loop, with_timeout(loop, 50ms, sleep_watching(loop, 10s, &cancelled))),
      "squall::with_timeout: timed out after 50 ms", TimeoutError);
  CHECK(cancelled);
  const double took = elapsed_ms(start);
  CHECK(uv_hrtime() / 1'000'000 >= loop_start_ms + 50);
  CHECK(took < 2000);
  CHECK(run_task(loop, with_timeout(loop, 5s, sleep_then(loop, 10ms, 9))) == 9);
  CHECK(run_task(loop, with_timeout(loop, 5s, run_blocking(loop, [] { return 3; }))) == 3);
  CHECK(loop.close() == 0);
}

TEST_CASE("stopping a task's token reaches every await below it") {
  Loop loop;
  std::stop_source source;
  bool a_cancelled = false;
  bool b_cancelled = false;
  loop.call_later(20ms, [&] { source.request_stop(); });
  const std::uint64_t start = uv_hrtime();
  CHECK_THROWS_AS(
      run_task(loop,
               when_all(sleep_watching(loop, 10s, &a_cancelled),
                        with_timeout(loop, 20s, sleep_watching(loop, 10s, &b_cancelled))),
               source.get_token()),
      CancelledError);
  CHECK(a_cancelled);
  CHECK(b_cancelled);
  CHECK(elapsed_ms(start) < 2000);
  CHECK(loop.close() == 0);
}

TEST_CASE("current_stop_token gives the running task its token") {
  Loop loop;
  std::stop_source source;
  const bool possible = run_task(
      loop,
      []() -> Task<bool> {
        std::stop_token token = co_await current_stop_token();
        co_return token.stop_possible();
      }(),
      source.get_token());
  CHECK(possible);
  CHECK(loop.close() == 0);
}

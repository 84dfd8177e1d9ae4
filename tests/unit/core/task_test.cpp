// Task<T>: values, exceptions, laziness, deep chains, spawn.
#include "squall/core/task.hpp"

#include <doctest/doctest.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "core_test_support.hpp"
#include "squall/core/awaitables.hpp"
#include "squall/core/loop.hpp"

using namespace squall;
using squall::testing::run_task;

namespace {

Task<int> forty_two() {
  co_return 42;
}

Task<std::string> greet(std::string name) {
  const int answer = co_await forty_two();
  co_return name + " " + std::to_string(answer);
}

Task<int> fail(std::string message) {
  throw std::runtime_error(message);
  co_return 0;
}

Task<std::string> catch_failure() {
  try {
    co_await fail("inner failure");
  } catch (const std::runtime_error& error) {
    co_return std::string("caught: ") + error.what();
  }
  co_return "not caught";
}

Task<int> nested(int depth) {
  if (depth == 0) co_return 0;
  const int below = co_await nested(depth - 1);
  co_return below + 1;
}

Task<long> many_in_sequence(int count) {
  long sum = 0;
  for (int i = 0; i < count; ++i) sum += co_await forty_two();
  co_return sum;
}

Task<void> mark(bool* ran) {
  *ran = true;
  co_return;
}

Task<void> sleep_then_mark(Loop& loop, bool* ran,
                           std::chrono::milliseconds delay = std::chrono::milliseconds(20)) {
  co_await sleep(loop, delay);
  *ran = true;
}

Task<void> throw_later(Loop& loop) {
  co_await sleep(loop, std::chrono::milliseconds(1));
  throw std::runtime_error("spawned failure");
}

}  // namespace

TEST_CASE("a freed coroutine frame is reused for the next frame of its size class") {
  if (!detail::frame_cache_enabled()) return;  // AddressSanitizer sees every frame freed.
  // Fill the 193..256 byte class, whatever earlier tests left in it: its top is then the frame
  // freed last.
  std::vector<void*> frames;
  for (int i = 0; i < 16; ++i) frames.push_back(detail::allocate_frame(200));
  for (void* frame : frames) detail::free_frame(frame, 200);
  void* first = detail::allocate_frame(200);
  CHECK(first == frames.back());
  detail::free_frame(first, 200);
  void* large = detail::allocate_frame(1100);  // Above the largest class: never kept.
  detail::free_frame(large, 1100);
  void* second = detail::allocate_frame(250);  // 250 bytes: the same class as 200.
  CHECK(second == first);
  detail::free_frame(second, 250);
}

TEST_CASE("a Task gives its value to the awaiter") {
  Loop loop;
  CHECK(run_task(loop, greet("answer")) == "answer 42");
  CHECK(loop.close() == 0);
}

TEST_CASE("an exception thrown in a Task is rethrown at the co_await") {
  Loop loop;
  CHECK(run_task(loop, catch_failure()) == "caught: inner failure");
  CHECK_THROWS_WITH_AS(run_task(loop, fail("to the top")), "to the top", std::runtime_error);
  CHECK(loop.close() == 0);
}

TEST_CASE("a Task is lazy: its body starts only when awaited") {
  Loop loop;
  bool ran = false;
  {
    Task<void> task = mark(&ran);
    CHECK_FALSE(ran);
  }
  CHECK_FALSE(ran);  // Dropped unstarted.
  Task<void> task = mark(&ran);
  run_task(loop, std::move(task));
  CHECK(ran);
  CHECK(loop.close() == 0);
}

TEST_CASE("100,000 nested awaits run in constant stack (symmetric transfer)") {
  Loop loop;
  CHECK(run_task(loop, nested(100'000)) == 100'000);
  CHECK(run_task(loop, many_in_sequence(100'000)) == 42L * 100'000);
  CHECK(loop.close() == 0);
}

TEST_CASE("spawn logs an exception escaping a detached task and the process goes on") {
  squall::testing::CapturedLog log;
  Loop loop;
  spawn(loop, throw_later(loop));
  bool ran = false;
  run_task(loop, sleep_then_mark(loop, &ran));
  CHECK(ran);
  CHECK(log.text().find("spawned task failed: spawned failure") != std::string::npos);
  CHECK(loop.close() == 0);
}

TEST_CASE("spawn starts the body at once, and refuses a closed loop") {
  Loop loop;
  bool ran = false;
  spawn(loop, mark(&ran));
  CHECK(ran);
  CHECK(loop.close() == 0);
  CHECK_THROWS_AS(spawn(loop, mark(&ran)), std::logic_error);
}

TEST_CASE("tasks still suspended when the loop closes are destroyed with their timers") {
  Loop loop;
  bool ran = false;
  spawn(loop, sleep_then_mark(loop, &ran, std::chrono::seconds(10)));
  spawn(loop, sleep_then_mark(loop, &ran, std::chrono::seconds(10)));
  // Under ASan this also shows that no frame or timer leaks.
  CHECK(loop.close() == 0);
  CHECK_FALSE(ran);
}

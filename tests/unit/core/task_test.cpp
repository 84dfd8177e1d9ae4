// Task<T>: values, exceptions, laziness, deep chains, spawn.
#include "squall/core/task.hpp"

#include <doctest/doctest.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/frame_cache.hpp"
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

TEST_CASE("the frame cache reuses blocks by 64-byte size class, keeps 16 a class, and drains") {
  // An instance of its own, so this runs in every build: under AddressSanitizer every block is
  // real heap memory, a block smaller than its class is an overflow when a larger frame of the
  // class reuses it, and one neither kept nor freed is a leak.
  using Cache = detail::FrameCache;
  Cache cache;
  CHECK(Cache::block_size(1) == 64);
  CHECK(Cache::block_size(64) == 64);
  CHECK(Cache::block_size(65) == 128);
  CHECK(Cache::block_size(1024) == 1024);
  CHECK(Cache::block_size(1025) == 1025);  // Above the largest class: its own size.
  CHECK_FALSE(Cache::by_class(0));

  // Reuse within a class (193..256 bytes): the block freed last comes back first, and it holds
  // the class's largest frame.
  void* a = cache.allocate(193);
  void* b = cache.allocate(200);
  CHECK(a != b);
  CHECK(cache.free(a, 193) == Cache::Freed::kept_first);
  CHECK(cache.free(b, 200) == Cache::Freed::kept);
  CHECK(cache.kept(Cache::size_class(256)) == 2);
  void* c = cache.allocate(256);
  CHECK(c == b);
  std::memset(c, 0x5a, 256);
  // Another class never gets it: 192 bytes is the class below, 257 the class above.
  void* below = cache.allocate(192);
  void* above = cache.allocate(257);
  CHECK(below != a);
  CHECK(above != a);
  std::memset(below, 0x5a, 192);
  std::memset(above, 0x5a, 320);
  CHECK(cache.kept(Cache::size_class(256)) == 1);
  CHECK(cache.allocate(250) == a);
  CHECK(cache.kept(Cache::size_class(256)) == 0);
  cache.free(a, 250);
  cache.free(c, 256);
  cache.free(below, 192);
  cache.free(above, 257);
  CHECK(cache.kept(Cache::size_class(192)) == 1);
  CHECK(cache.kept(Cache::size_class(257)) == 1);

  // Larger than the largest class: never kept.
  void* large = cache.allocate(1100);
  std::memset(large, 0x5a, 1100);
  CHECK(cache.free(large, 1100) == Cache::Freed::deleted);

  // At most kPerClass a class: the next one is deleted at once.
  std::vector<void*> blocks;
  for (int i = 0; i < Cache::kPerClass + 1; ++i) blocks.push_back(cache.allocate(64));
  for (int i = 0; i < Cache::kPerClass; ++i) {
    CHECK(cache.free(blocks[static_cast<std::size_t>(i)], 64) != Cache::Freed::deleted);
  }
  CHECK(cache.free(blocks.back(), 64) == Cache::Freed::deleted);
  CHECK(cache.kept(0) == Cache::kPerClass);

  // The drain frees everything kept (LeakSanitizer), and what is freed after it is not kept.
  cache.drain();
  for (std::size_t size_class = 0; size_class < Cache::kClasses; ++size_class) {
    CHECK(cache.kept(size_class) == 0);
  }
  void* late = cache.allocate(100);
  CHECK(cache.free(late, 100) == Cache::Freed::deleted);
  CHECK(cache.kept(Cache::size_class(100)) == 0);
}

TEST_CASE("a freed coroutine frame is reused for the next frame of its size class") {
  // The thread's own cache, which coroutine promises use (off under AddressSanitizer, which
  // must see every frame freed; the test above checks the cache itself in every build).
  if (!detail::frame_cache_enabled()) return;
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

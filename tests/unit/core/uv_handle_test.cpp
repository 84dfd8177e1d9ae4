#include "squall/core/uv_handle.hpp"

#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>

#include <doctest/doctest.h>

#include "core/handle_lifetime.hpp"
#include "squall/core/loop.hpp"

namespace squall {

namespace {

// A timer that runs forever: it stays open until its owner or the Loop closes it.
struct TimerOwner {
  explicit TimerOwner(Loop& loop) : timer(loop, this, uv_timer_init, "test timer") {
    uv_timer_start(
        timer.get(), [](uv_timer_t* fired) { ++static_cast<TimerOwner*>(fired->data)->ticks; }, 1,
        1);
  }
  UvHandle<uv_timer_t> timer;
  int ticks = 0;
};

}  // namespace

TEST_CASE("UvHandle: a handle is closed once and freed in every end order") {
  testing::check_every_end_order([](Loop& loop) { return std::make_unique<TimerOwner>(loop); });
}

TEST_CASE("UvHandle: Loop::close() closes it with its own callback; the owner sees it closed") {
  Loop loop;
  static int hooks = 0;
  hooks = 0;
  UvHandle<uv_timer_t> timer(loop, nullptr, uv_timer_init);
  timer.on_closed([](uv_timer_t*) { ++hooks; });
  CHECK(timer.is_open());
  CHECK_FALSE(timer.is_closed());
  CHECK(loop.close() == 0);
  CHECK_FALSE(timer.is_open());
  CHECK(timer.is_closed());
  CHECK(hooks == 1);
  CHECK(timer.get() != nullptr);  // Still held (closed) until the owner lets go.
  timer.reset();
  CHECK_FALSE(timer);
}

TEST_CASE("UvHandle: close() then destruction, before or after the close callback") {
  Loop loop;
  {
    UvHandle<uv_timer_t> timer(loop, nullptr, uv_timer_init);
    timer.close();
    timer.close();  // Harmless.
    CHECK_FALSE(timer.is_open());
  }  // Destroyed while closing: the close callback frees it.
  UvHandle<uv_timer_t> timer(loop, nullptr, uv_timer_init);
  timer.close();
  uv_run(loop.uv(), UV_RUN_NOWAIT);
  CHECK(timer.is_closed());
  CHECK(loop.close() == 0);
}

TEST_CASE("UvHandle: an owner may let go from its on_closed hook") {
  Loop loop;
  static UvHandle<uv_timer_t>* held = nullptr;
  auto timer = std::make_unique<UvHandle<uv_timer_t>>(loop, nullptr, uv_timer_init);
  held = timer.get();
  timer->on_closed([](uv_timer_t*) { held->reset(); });
  CHECK(loop.close() == 0);
  CHECK_FALSE(*timer);
}

TEST_CASE("UvHandle: moves transfer the handle; assigning over one closes the old") {
  Loop loop;
  UvHandle<uv_timer_t> first(loop, nullptr, uv_timer_init);
  uv_timer_t* raw = first.get();
  UvHandle<uv_timer_t> second(std::move(first));
  CHECK_FALSE(first);
  CHECK(second.get() == raw);
  second = UvHandle<uv_timer_t>(loop, nullptr, uv_timer_init);
  CHECK(second.get() != raw);
  CHECK(loop.close() == 0);
}

TEST_CASE("UvHandle: a failed init throws naming the handle; a closed loop refuses") {
  Loop loop;
  CHECK_THROWS_WITH_AS(
      UvHandle<uv_poll_t>(
          loop, nullptr, [](uv_loop_t*, uv_poll_t*) { return UV_EBADF; }, "poll for test socket"),
      doctest::Contains("cannot open a poll for test socket: bad file descriptor"),
      std::system_error);
  CHECK(loop.close() == 0);
  CHECK_THROWS_WITH_AS(UvHandle<uv_timer_t>(loop, nullptr, uv_timer_init, "test timer"),
                       "cannot open a test timer: the loop is closed", std::logic_error);
}

}  // namespace squall

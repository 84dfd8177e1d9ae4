// Loop: call_every, zero and negative delays, call_soon after close, close hooks.
#include "squall/core/loop.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

using namespace squall;
using namespace std::chrono_literals;

TEST_CASE("call_later with a zero or negative delay runs on the next iteration") {
  Loop loop;
  int ran = 0;
  loop.call_later(-5ms, [&] { ++ran; });
  loop.call_later(0ms, [&] {
    ++ran;
    loop.call_later(-1000ms, [&] {
      ++ran;
      loop.stop();
    });
  });
  const auto watchdog = loop.call_later(5s, [&] { loop.stop(); });
  loop.run();
  loop.cancel(watchdog);
  CHECK(ran == 3);
  CHECK(loop.close() == 0);
}

TEST_CASE("call_every runs on its period until cancelled, even from its own callback") {
  Loop loop;
  int runs = 0;
  Loop::TimerId id = 0;
  const std::uint64_t start = loop.now_ms();
  std::uint64_t last = 0;
  id = loop.call_every(10ms, [&] {
    last = loop.now_ms();
    if (++runs == 5) {
      CHECK(loop.cancel(id));
      loop.call_later(50ms, [&] { loop.stop(); });
    }
  });
  const auto watchdog = loop.call_later(5s, [&] { loop.stop(); });
  loop.run();
  loop.cancel(watchdog);
  CHECK(runs == 5);  // Nothing after the cancel.
  CHECK(last - start >= 50);
  CHECK_FALSE(loop.cancel(id));
  CHECK(loop.close() == 0);
}

TEST_CASE("call_every skips the runs a blocked loop missed instead of bunching them") {
  Loop loop;
  std::vector<std::uint64_t> runs_ns;
  std::vector<std::uint64_t> runs_ms;  // The loop's clock, which the grid is laid on.
  const std::uint64_t start_ms = loop.now_ms();
  loop.call_every(20ms, [&] {
    runs_ns.push_back(uv_hrtime());
    runs_ms.push_back(loop.now_ms());
    // The first run blocks the loop for more than three periods.
    if (runs_ns.size() == 1) std::this_thread::sleep_for(75ms);
    if (runs_ns.size() == 5) loop.stop();
  });
  const auto watchdog = loop.call_later(5s, [&] { loop.stop(); });
  loop.run();
  loop.cancel(watchdog);
  REQUIRE(runs_ns.size() == 5);
  // The late run comes once, right after the block; the missed ones are not made up (catching
  // up would put several runs at once, in the same 20 ms slot of the loop clock's grid); then
  // the runs follow the grid again.
  std::vector<std::uint64_t> slots;
  for (const std::uint64_t at : runs_ms) slots.push_back((at - start_ms) / 20);
  for (std::size_t i = 1; i < slots.size(); ++i) CHECK(slots[i] > slots[i - 1]);
  CHECK(static_cast<double>(runs_ns[1] - runs_ns[0]) / 1e6 >= 74);
  CHECK(static_cast<double>(runs_ns[4] - runs_ns[1]) / 1e6 >= 40);
  CHECK(loop.close() == 0);
}

TEST_CASE("a throwing call_every callback is logged and keeps running") {
  Loop loop;
  int runs = 0;
  loop.call_every(5ms, [&] {
    if (++runs == 3) loop.stop();
    throw std::runtime_error("periodic failure");
  });
  const auto watchdog = loop.call_later(5s, [&] { loop.stop(); });
  loop.run();
  loop.cancel(watchdog);
  CHECK(runs == 3);
  CHECK(loop.close() == 0);
}

TEST_CASE("call_soon after close() returns false and never runs the callback") {
  Loop loop;
  bool ran = false;
  CHECK(loop.call_soon([&] {
    ran = true;
    loop.stop();
  }));
  loop.run();
  CHECK(ran);
  RemoteLoop remote = loop.remote();
  CHECK(loop.close() == 0);
  ran = false;
  CHECK_FALSE(loop.call_soon([&] { ran = true; }));
  CHECK_FALSE(remote.call_soon([&] { ran = true; }));
  CHECK_FALSE(ran);
  CHECK_FALSE(RemoteLoop().call_soon([] {}));
}

TEST_CASE("a RemoteLoop posts safely from a thread that outlives the Loop") {
  std::atomic<bool> stop{false};
  std::atomic<int> refused{0};
  std::atomic<int> accepted{0};
  std::thread poster;
  int ran = 0;
  {
    Loop loop;
    RemoteLoop remote = loop.remote();
    poster = std::thread([remote, &stop, &refused, &accepted] {
      while (!stop) {
        if (remote.call_soon([] {})) {
          ++accepted;
        } else {
          ++refused;
        }
        std::this_thread::yield();
      }
    });
    loop.call_later(30ms, [&] {
      ++ran;
      loop.stop();
    });
    loop.run();
    // The Loop closes and is destroyed while the thread keeps posting.
  }
  while (refused == 0) std::this_thread::yield();
  stop = true;
  poster.join();
  CHECK(ran == 1);
  CHECK(accepted > 0);
  CHECK(refused > 0);
}

namespace {

// An owner of a handle the Loop does not know (as an HTTP connection holds its socket inline):
// its close hook closes the handle with its own callback, which must see it run.
struct OwnHandle {
  uv_timer_t timer{};
  squall::detail::CloseHook hook;
  bool closed_by_own_callback = false;
  bool open_when_hook_ran = false;
};

}  // namespace

TEST_CASE("close() runs the close hooks before it closes the handles it does not know") {
  OwnHandle listed;
  OwnHandle unlisted;
  {
    Loop loop;
    for (OwnHandle* own : {&listed, &unlisted}) {
      REQUIRE(uv_timer_init(loop.uv(), &own->timer) == 0);
      own->timer.data = own;
      own->hook.owner = own;
      own->hook.run = [](void* owner) noexcept {
        auto* self = static_cast<OwnHandle*>(owner);
        auto* handle = reinterpret_cast<uv_handle_t*>(&self->timer);
        self->open_when_hook_ran = uv_is_closing(handle) == 0;
        uv_close(handle, [](uv_handle_t* closed) {
          static_cast<OwnHandle*>(closed->data)->closed_by_own_callback = true;
        });
      };
      loop.adopt_close_hook(own->hook);
    }
    // An owner that went away first unlinks its hook: close() does not run it.
    unlisted.hook.unlink();
    uv_close(reinterpret_cast<uv_handle_t*>(&unlisted.timer), nullptr);
    CHECK(loop.close() == 0);
  }
  CHECK(listed.open_when_hook_ran);
  CHECK(listed.closed_by_own_callback);
  CHECK_FALSE(unlisted.open_when_hook_ran);
  CHECK_FALSE(unlisted.closed_by_own_callback);
}

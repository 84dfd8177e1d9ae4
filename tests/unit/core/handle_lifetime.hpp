// Checks an owner of libuv handles against every order in which it and its Loop can end.
#pragma once

#include <memory>

#include <doctest/doctest.h>

#include "squall/core/loop.hpp"

namespace squall::testing {

// `make(loop)` returns a std::unique_ptr to a new owner of handles on `loop`. Each order is run
// on a fresh Loop: the owner destroyed before Loop::close(); Loop::close() before the owner is
// destroyed; the Loop destroyed (its memory freed) before the owner. A handle closed twice, or
// touched after its Loop is gone, fails under ASan; a handle never freed fails LeakSanitizer;
// a handle left open makes Loop::close() return UV_EBUSY.
template <typename Make>
void check_every_end_order(Make make) {
  {
    INFO("the owner is destroyed before Loop::close()");
    Loop loop;
    auto owner = make(loop);
    uv_run(loop.uv(), UV_RUN_NOWAIT);
    owner.reset();
    CHECK(loop.close() == 0);
  }
  {
    INFO("Loop::close() runs before the owner is destroyed");
    Loop loop;
    auto owner = make(loop);
    uv_run(loop.uv(), UV_RUN_NOWAIT);
    CHECK(loop.close() == 0);
    owner.reset();
  }
  {
    INFO("the Loop is destroyed before the owner");
    auto loop = std::make_unique<Loop>();
    auto owner = make(*loop);
    uv_run(loop->uv(), UV_RUN_NOWAIT);
    loop.reset();
    owner.reset();
  }
}

}  // namespace squall::testing

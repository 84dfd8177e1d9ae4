#include "squall/core/loop.hpp"

#include "squall/core/uv_handle.hpp"

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <system_error>

#include <spdlog/spdlog.h>

namespace squall {

namespace {

void check(int status, const char* what) {
  if (status < 0) {
    throw std::system_error(-status, std::generic_category(),
                            std::string(what) + ": " + uv_strerror(status));
  }
}

}  // namespace

struct Loop::TimerNode {
  UvHandle<uv_timer_t> timer;  // timer.data -> this.
  Loop* loop;                  // For removing this node from timers_.
  TimerId id;                  // The key in timers_.
  std::uint64_t period_ms;     // call_every's period; 0 for a one-shot call_later.
  std::uint64_t due_ms;        // When the current run is due (uv_now clock): call_every's grid.
  Callback callback;           // What to run when the timer fires.
};

Loop::Loop() : queue_(std::make_shared<detail::CallQueue>()) {
  check(uv_loop_init(&loop_), "uv_loop_init");
  check(uv_async_init(&loop_, &wakeup_, &Loop::on_async), "uv_async_init");
  // The wake-up handle stays referenced, so run() goes on until stop(), as Tornado's
  // IOLoop.start() does, and callbacks queued before run() are never lost.
  wakeup_.data = this;
  queue_->wakeup = &wakeup_;
}

int Loop::close() {
  if (closed_) return 0;
  closed_ = true;
  // From here on call_soon, from any thread, returns false: nothing can reach wakeup_ again.
  std::vector<Callback> dropped;
  {
    std::lock_guard<std::mutex> lock(queue_->mutex);
    queue_->wakeup = nullptr;
    dropped.swap(queue_->calls);
  }
  // Suspended tasks are destroyed while their handles are still open: each awaitable stops and
  // closes what it waits on, and those handles are closed by the run below.
  // One at a time: destroying a frame may end (and unlist) others.
  while (tasks_.next != &tasks_) {
    detail::TaskLink* link = tasks_.next;
    link->unlink();
    link->frame.destroy();
  }
  dropped.clear();
  // call_later timers are closed with their own callbacks, which free their nodes.
  while (!timers_.empty()) cancel(timers_.begin()->first);
  // Owners of handles of their own close them (one at a time: a hook may unlist others).
  while (close_hooks_.next != &close_hooks_) {
    detail::CloseHook* hook = close_hooks_.next;
    hook->unlink();
    hook->run(hook->owner);
  }
  // UvHandles still open are closed with their own close callback, which frees those whose
  // owner is gone and tells the others' owners that the handle is closed.
  for (detail::HandleLink* link = handles_.next; link != &handles_; link = link->next) {
    if (!uv_is_closing(link->handle)) uv_close(link->handle, link->close_callback);
  }
  // Anything else (the wake-up handle, handles owned by hand) is closed without a callback.
  uv_walk(
      &loop_,
      [](uv_handle_t* handle, void*) {
        if (!uv_is_closing(handle)) uv_close(handle, nullptr);
      },
      nullptr);
  // A stop() not followed by run() makes the first uv_run return at once: run until idle.
  while (uv_run(&loop_, UV_RUN_DEFAULT) != 0) {
  }
  return uv_loop_close(&loop_);
}

Loop::~Loop() {
  const int status = close();
  if (status != 0) {
    std::fprintf(stderr, "squall: uv_loop_close failed (%s): a handle was left open\n",
                 uv_strerror(status));
  }
}

void Loop::run() {
  uv_run(&loop_, UV_RUN_DEFAULT);
}

namespace {

bool post(detail::CallQueue& queue, std::function<void()>& callback) {
  std::lock_guard<std::mutex> lock(queue.mutex);
  if (queue.wakeup == nullptr) return false;
  queue.calls.push_back(std::move(callback));
  // Sent under the lock, so close() cannot close the handle in between. uv_async_send
  // coalesces: one wake-up may carry many callbacks, hence the queue.
  uv_async_send(queue.wakeup);
  return true;
}

}  // namespace

bool RemoteLoop::call_soon(std::function<void()> callback) const {
  return queue_ != nullptr && post(*queue_, callback);
}

bool Loop::call_soon(Callback callback) {
  return post(*queue_, callback);
}

void Loop::on_async(uv_async_t* handle) {
  auto* self = static_cast<Loop*>(handle->data);
  {
    std::lock_guard<std::mutex> lock(self->queue_->mutex);
    self->running_.swap(self->queue_->calls);
  }
  for (Callback& callback : self->running_) {
    try {
      callback();
    } catch (const std::exception& error) {
      spdlog::error("call_soon callback threw: {}", error.what());
    }
  }
  self->running_.clear();
}

Loop::TimerId Loop::call_later(std::chrono::milliseconds delay, Callback callback) {
  // libuv takes an unsigned timeout: a negative one would become a date far in the future.
  const auto delay_ms = delay.count() > 0 ? static_cast<std::uint64_t>(delay.count()) : 0;
  return start_timer(delay_ms, 0, std::move(callback));
}

Loop::TimerId Loop::call_every(std::chrono::milliseconds period, Callback callback) {
  const auto period_ms = period.count() > 1 ? static_cast<std::uint64_t>(period.count()) : 1;
  return start_timer(period_ms, period_ms, std::move(callback));
}

Loop::TimerId Loop::start_timer(std::uint64_t delay_ms, std::uint64_t period_ms,
                                Callback callback) {
  auto node = std::make_unique<TimerNode>();
  node->loop = this;
  node->id = next_timer_id_++;
  node->period_ms = period_ms;
  node->due_ms = uv_now(&loop_) + delay_ms;
  node->callback = std::move(callback);
  node->timer = UvHandle<uv_timer_t>(*this, node.get(), uv_timer_init, "timer");
  uv_timer_start(node->timer.get(), &Loop::on_timer, delay_ms, 0);
  const TimerId id = node->id;
  timers_.emplace(id, std::move(node));
  return id;
}

void Loop::on_timer(uv_timer_t* timer) {
  auto* fired = static_cast<TimerNode*>(timer->data);
  Loop* loop = fired->loop;
  const TimerId id = fired->id;
  if (fired->period_ms == 0) {
    // Destroying the node closes its timer; libuv frees it after this callback.
    const auto it = loop->timers_.find(id);
    const std::unique_ptr<TimerNode> node = std::move(it->second);
    loop->timers_.erase(it);
    Callback run = std::move(node->callback);
    try {
      run();
    } catch (const std::exception& error) {
      spdlog::error("call_later callback threw: {}", error.what());
    }
    return;
  }
  // The next run is the first point of the grid still ahead: missed runs are skipped.
  const std::uint64_t now = uv_now(timer->loop);
  std::uint64_t next = fired->due_ms + fired->period_ms;
  if (next <= now) next += (now - next) / fired->period_ms * fired->period_ms + fired->period_ms;
  fired->due_ms = next;
  uv_timer_start(timer, &Loop::on_timer, next - now, 0);
  // The callback runs from here, not from the node, so that it may cancel itself.
  Callback run = std::move(fired->callback);
  try {
    run();
  } catch (const std::exception& error) {
    spdlog::error("call_every callback threw: {}", error.what());
  }
  const auto still = loop->timers_.find(id);
  if (still != loop->timers_.end()) still->second->callback = std::move(run);
}

bool Loop::cancel(TimerId id) noexcept {
  // Destroying the node closes its timer.
  return timers_.erase(id) != 0;
}

namespace {

struct BlockingWork {
  uv_work_t request;                             // libuv's pool request; data -> this.
  std::function<void()> work;                    // Runs on a pool thread.
  std::function<void(std::exception_ptr)> done;  // Runs on the loop thread.
  std::exception_ptr error;                      // What work threw, if anything.
};

}  // namespace

void Loop::run_blocking(std::function<void()> work, std::function<void(std::exception_ptr)> done) {
  auto job = std::make_unique<BlockingWork>();
  job->work = std::move(work);
  job->done = std::move(done);
  job->request.data = job.get();
  check(uv_queue_work(
            &loop_, &job->request,
            [](uv_work_t* request) {
              auto* running = static_cast<BlockingWork*>(request->data);
              try {
                running->work();
              } catch (...) {
                running->error = std::current_exception();
              }
            },
            [](uv_work_t* request, int status) {
              std::unique_ptr<BlockingWork> finished(static_cast<BlockingWork*>(request->data));
              if (status == UV_ECANCELED && !finished->error) {
                finished->error = std::make_exception_ptr(
                    std::system_error(ECANCELED, std::generic_category(), "work cancelled"));
              }
              try {
                finished->done(finished->error);
              } catch (const std::exception& error) {
                spdlog::error("run_blocking completion threw: {}", error.what());
              }
            }),
        "uv_queue_work");
  job.release();
}

}  // namespace squall

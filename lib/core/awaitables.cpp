#include "squall/core/awaitables.hpp"

#include <string>
#include <system_error>

namespace squall {

// ---- sleep ------------------------------------------------------------------------------------

void Sleep::on_timer(uv_timer_t* timer) {
  // The waiter may destroy this Sleep (closing the timer) before resume() returns: nothing here
  // touches the node afterwards.
  const std::coroutine_handle<> waiter = static_cast<Sleep*>(timer->data)->waiter_;
  detail::resume(waiter);
}

bool Sleep::start(std::coroutine_handle<> waiter, std::stop_token token) {
  if (token.stop_requested()) {
    cancelled_ = true;
    return false;
  }
  // A Sleep awaited again reuses its timer.
  if (!timer_) timer_ = UvHandle<uv_timer_t>(*loop_, this, uv_timer_init, "sleep timer");
  waiter_ = waiter;
  const auto delay_ms = delay_.count() > 0 ? static_cast<std::uint64_t>(delay_.count()) : 0;
  uv_timer_start(timer_.get(), &Sleep::on_timer, delay_ms, 0);
  if (token.stop_possible()) on_stop_.emplace(std::move(token), OnStop{this});
  return true;
}

void Sleep::OnStop::operator()() const noexcept {
  // Stop the timer first, then resume from a fresh timer run on the next loop iteration:
  // never from inside request_stop(), whose caller may be in the middle of something.
  self->cancelled_ = true;
  uv_timer_stop(self->timer_.get());
  uv_timer_start(self->timer_.get(), &Sleep::on_timer, 0, 0);
}

void Sleep::await_resume() {
  on_stop_.reset();
  if (cancelled_) throw CancelledError("squall::sleep: cancelled");
}

Sleep::~Sleep() {
  // The stop callback goes first: it uses the timer. The timer closes by itself.
  on_stop_.reset();
}

// ---- run_blocking -----------------------------------------------------------------------------

namespace detail {

namespace {

void on_work(uv_work_t* request) {
  static_cast<WorkNode*>(request->data)->run();
}

void on_work_done(uv_work_t* request, int status) {
  auto* node = static_cast<WorkNode*>(request->data);
  node->finished = true;
  node->status = status;
  if (node->abandoned) {
    delete node;
    return;
  }
  if (node->waiter) resume(node->waiter);
}

}  // namespace

bool BlockingOperation::start(std::coroutine_handle<> waiter, std::stop_token token) {
  if (token.stop_requested()) {
    cancelled_ = true;
    return false;
  }
  waiter_ = waiter;
  node_->waiter = waiter;
  node_->request.data = node_;
  const int status = uv_queue_work(loop_->uv(), &node_->request, on_work, on_work_done);
  if (status < 0) {
    node_->error = std::make_exception_ptr(std::system_error(
        -status, std::generic_category(),
        std::string("squall::run_blocking: uv_queue_work: ") + uv_strerror(status)));
    return false;
  }
  started_ = true;
  if (token.stop_possible()) on_stop_.emplace(std::move(token), OnStop{this});
  return true;
}

void BlockingOperation::OnStop::operator()() const noexcept {
  self->cancelled_ = true;
  // Not started yet: the pool drops it and the after-work callback resumes us (UV_ECANCELED).
  if (uv_cancel(reinterpret_cast<uv_req_t*>(&self->node_->request)) == 0) return;
  // Already running: it cannot be interrupted. Resume on the next loop turn; the after-work
  // callback, finding no waiter, only records the end.
  self->node_->waiter = nullptr;
  const std::coroutine_handle<> waiter = self->waiter_;
  self->loop_->call_soon([waiter] { resume(waiter); });
}

void BlockingOperation::check_outcome() {
  on_stop_.reset();
  if (cancelled_ || node_->status == UV_ECANCELED) {
    throw CancelledError("squall::run_blocking: cancelled");
  }
  if (node_->error) std::rethrow_exception(node_->error);
}

BlockingOperation::~BlockingOperation() {
  on_stop_.reset();
  if (node_ == nullptr) return;
  if (started_ && !node_->finished) {
    node_->abandoned = true;  // The after-work callback frees it.
    node_->waiter = nullptr;
  } else {
    delete node_;
  }
}

}  // namespace detail

namespace detail {

Task<void> sleep_task(Loop& loop, std::chrono::milliseconds delay) {
  co_await sleep(loop, delay);
}

void throw_timeout(std::chrono::milliseconds timeout) {
  throw TimeoutError("squall::with_timeout: timed out after " + std::to_string(timeout.count()) +
                     " ms");
}

}  // namespace detail

}  // namespace squall

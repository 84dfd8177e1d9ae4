#include "server/workers.hpp"

#include <pthread.h>
#include <sched.h>

#include <chrono>
#include <exception>
#include <future>
#include <string>

namespace squall::squalld {

namespace {

std::uint64_t steady_ms() noexcept {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                        std::chrono::steady_clock::now().time_since_epoch())
                                        .count());
}

}  // namespace

std::size_t usable_cores() noexcept {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return 1;
  const int count = CPU_COUNT(&set);
  return count > 0 ? static_cast<std::size_t>(count) : 1;
}

Worker::Worker(std::size_t index, Loop& primary)
    : index_(index), loop_(&primary), remote_(primary.remote()) {}

Worker::~Worker() {
  stop();
  join();
}

void Worker::start_thread(const std::function<void(Worker&)>& setup) {
  std::promise<void> ready;
  std::future<void> started = ready.get_future();
  thread_ = std::thread([this, &setup, ready = std::move(ready)]() mutable {
    const std::string name = "squall-worker" + std::to_string(index_);
    pthread_setname_np(pthread_self(), name.c_str());
    try {
      own_loop_ = std::make_unique<Loop>();
      loop_ = own_loop_.get();
      remote_ = own_loop_->remote();
      setup(*this);
    } catch (...) {
      tear_down();
      ready.set_exception(std::current_exception());
      return;
    }
    // `setup` belongs to the caller, which returns once this is set: not used below.
    ready.set_value();
    loop_->run();
    tear_down();
  });
  try {
    started.get();
  } catch (...) {
    join();
    throw;
  }
}

void Worker::stop() noexcept {
  if (own_loop_ == nullptr && !thread_.joinable()) return;
  remote_.call_soon([this] { loop_->stop(); });
}

void Worker::join() noexcept {
  if (thread_.joinable()) thread_.join();
}

void Worker::tear_down() noexcept {
  if (heartbeat_ != 0) {
    loop_->cancel(heartbeat_);
    heartbeat_ = 0;
  }
  if (desk) desk->clear();
  server.reset();
  lag.reset();
  observer.reset();
  if (own_loop_ != nullptr) {
    own_loop_->close();
    desk.reset();
  }
}

void Worker::start_heartbeat(std::uint64_t period_ms) {
  last_beat_ms_.store(steady_ms(), std::memory_order_relaxed);
  heartbeat_ = loop_->call_every(std::chrono::milliseconds(period_ms), [this] {
    last_beat_ms_.store(steady_ms(), std::memory_order_relaxed);
  });
}

bool Worker::beating_within(std::uint64_t max_age_ms) const noexcept {
  const std::uint64_t last = last_beat_ms_.load(std::memory_order_relaxed);
  return last == 0 || steady_ms() - last <= max_age_ms;
}

}  // namespace squall::squalld

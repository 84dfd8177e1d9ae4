// squalld's workers: one event loop each, each with its own http::Server and listening sockets
// ([server] workers). Worker 0 runs on the main thread's loop, the primary loop, where the
// signals, the job service and the metrics registry live; every other worker owns a loop and
// the thread that runs it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "server/answers.hpp"
#include "server/routes.hpp"
#include "squall/core/loop.hpp"
#include "squall/core/loop_lag.hpp"
#include "squall/http/server.hpp"

namespace squall::squalld {

// The number of cores this process may run on (sched_getaffinity), at least 1: what
// [server] workers = "auto" means.
std::size_t usable_cores() noexcept;

// One worker's loop-owned objects. Built, used and torn down on its loop thread only; other
// threads reach it through `remote` (Loop::call_soon), and read only the atomic fields and the
// server's and lag monitor's thread-safe figures.
class Worker {
 public:
  // The primary worker: on `primary`, the main thread's loop.
  Worker(std::size_t index, Loop& primary);
  // Stops and joins the thread of a worker that has one (after its loop stopped, it tore down
  // its objects itself).
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Starts a thread that makes the worker's own loop, runs `setup` on it (which fills the
  // fields below) and then runs the loop until stop(). Returns once `setup` ran; an exception
  // it threw is rethrown here (the thread has ended then).
  void start_thread(const std::function<void(Worker&)>& setup);
  // Makes the loop's run() return (any thread); a no-op for the primary worker, whose loop the
  // main thread stops.
  void stop() noexcept;
  // Waits for the thread (after stop()).
  void join() noexcept;
  // Drops parked answers and destroys the server and monitors; closes the loop if it is the
  // worker's own. Loop thread, once the loop no longer runs (the thread does it for itself).
  void tear_down() noexcept;

  // Whether the loop ran its heartbeat within `max_age_ms` (any thread; for the watchdog).
  bool beating_within(std::uint64_t max_age_ms) const noexcept;
  // Starts the heartbeat timer every `period_ms` (loop thread).
  void start_heartbeat(std::uint64_t period_ms);

  std::size_t index() const noexcept { return index_; }
  Loop& loop() noexcept { return *loop_; }
  bool primary() const noexcept { return own_loop_ == nullptr; }
  const RemoteLoop& remote() const noexcept { return remote_; }

  // Filled by the setup, in this order (torn down in reverse).
  std::unique_ptr<AnswerDesk> desk;                 // Answers computed on the primary loop.
  std::unique_ptr<HttpMetrics::Observer> observer;  // This loop's request metrics.
  std::unique_ptr<LoopLagMonitor> lag;              // How late this loop runs.
  std::unique_ptr<http::Server> server;             // This loop's connections and listeners.

 private:
  const std::size_t index_;                     // 0 for the primary worker.
  std::unique_ptr<Loop> own_loop_;              // Null for the primary worker.
  Loop* loop_;                                  // own_loop_, or the primary loop.
  RemoteLoop remote_;                           // loop_, for other threads.
  std::thread thread_;                          // Runs own_loop_.
  Loop::TimerId heartbeat_ = 0;                 // call_every updating last_beat_ms_.
  std::atomic<std::uint64_t> last_beat_ms_{0};  // steady_clock ms of the latest heartbeat.
};

}  // namespace squall::squalld

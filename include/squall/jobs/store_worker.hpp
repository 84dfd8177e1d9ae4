// The one thread that owns the JobStore. SQLite commits wait for an fsync, so they never run
// on the loop thread; inserts that arrive while a commit is under way are committed together
// by the next one (group commit), which is where durable throughput comes from. On Linux the
// thread runs under SCHED_BATCH, so that its wake-ups never preempt a loop sharing its CPU.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include "squall/jobs/store.hpp"

namespace squall::jobs {

class StoreWorker {
 public:
  // Runs a callback on the loop thread soon; callable from any thread (Loop::call_soon).
  using PostToLoop = std::function<void(std::function<void()>)>;
  // An insert's outcome on the loop thread: the stored job, or the error text.
  using InsertDone = std::function<void(std::variant<Inserted, std::string>)>;
  // Runs on the worker thread; posts its own results through the PostToLoop it captured.
  using Operation = std::function<void(JobStore&)>;

  // The most inserts one commit takes; the rest go into the next one.
  static constexpr std::size_t max_batch = 1024;

  // Starts the thread, which owns `store` (not null) from now on.
  StoreWorker(std::unique_ptr<JobStore> store, PostToLoop post_to_loop);
  // Calls stop().
  ~StoreWorker();
  StoreWorker(const StoreWorker&) = delete;
  StoreWorker& operator=(const StoreWorker&) = delete;

  // Queues `job`; after the commit that stores it, `done` runs on the loop thread exactly
  // once. A failed commit fails every insert of its batch and stores none of them. After
  // stop(), `done` gets an error at once (still through post_to_loop). Any thread.
  void insert(NewJob job, InsertDone done);
  // Queues `operation`, run on the worker thread after every insert queued before it has
  // committed (inserts queued after it may be committed first: they join the waiting batch).
  // Operations run in the order they were queued. An exception escaping it is rethrown on the loop
  // thread (logged there). Returns false, without running it, after stop(). Any thread.
  bool run(Operation operation);
  // Runs everything queued, then joins the thread. Idempotent; not from inside an Operation.
  // Results are posted to the loop, so the loop should still run afterwards to deliver them.
  void stop();

  // Inserts and operations queued and not yet started.
  std::size_t queue_depth() const;
  // Insert batches committed so far (a failed batch does not count).
  std::uint64_t batches_committed() const noexcept {
    return batches_committed_.load(std::memory_order_relaxed);
  }
  // Inserts committed so far, in all batches; / batches_committed() = mean batch size.
  std::uint64_t inserts_committed() const noexcept {
    return inserts_committed_.load(std::memory_order_relaxed);
  }
  // The store's WAL checkpoints so far (JobStore::checkpoint_stats). Any thread.
  CheckpointStats checkpoint_stats() const noexcept { return store_->checkpoint_stats(); }

 private:
  struct PendingInsert {
    NewJob job;       // What to store.
    InsertDone done;  // Posted with the outcome.
  };
  using Item = std::variant<PendingInsert, Operation>;

  void thread_main();
  void commit_batch(std::vector<PendingInsert>& batch);
  void run_operation(Operation& operation);

  std::unique_ptr<JobStore> store_;  // Touched only by the worker thread once it started.
  PostToLoop post_to_loop_;          // The only way results reach the loop.
  mutable std::mutex mutex_;         // Guards queue_ and stopping_.
  std::condition_variable wakeup_;   // Signalled when queue_ grows or stopping_ is set.
  std::deque<Item> queue_;           // Waiting work, in arrival order.
  bool stopping_ = false;            // stop() was called: accept nothing new.
  std::mutex join_mutex_;            // Serializes concurrent stop() calls around join().
  std::atomic<std::uint64_t> batches_committed_{0};  // See batches_committed().
  std::atomic<std::uint64_t> inserts_committed_{0};  // See inserts_committed().
  std::thread thread_;                               // Started last, after every member it uses.
  std::thread::id worker_id_;  // thread_'s id, so that stop() can refuse to join itself.
};

}  // namespace squall::jobs

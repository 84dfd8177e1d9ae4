#include "squall/jobs/store_worker.hpp"

#include <pthread.h>

#include <exception>
#include <stdexcept>
#include <utility>

#include "core/background_thread.hpp"

namespace squall::jobs {

namespace {

// The loop logs exceptions thrown by its callbacks only if they derive from std::exception.
std::exception_ptr current_as_std_exception() {
  try {
    throw;
  } catch (const std::exception&) {
    return std::current_exception();
  } catch (...) {
    return std::make_exception_ptr(std::runtime_error("job store operation threw a non-exception"));
  }
}

std::string current_error_text() {
  try {
    throw;
  } catch (const std::exception& error) {
    return error.what();
  } catch (...) {
    return "job store: something that is not a std::exception was thrown";
  }
}

}  // namespace

StoreWorker::StoreWorker(std::unique_ptr<JobStore> store, PostToLoop post_to_loop)
    : store_(std::move(store)), post_to_loop_(std::move(post_to_loop)) {
  if (!store_) throw std::invalid_argument("StoreWorker: store is null");
  if (!post_to_loop_) throw std::invalid_argument("StoreWorker: post_to_loop is empty");
  thread_ = std::thread([this] { thread_main(); });
  worker_id_ = thread_.get_id();
}

StoreWorker::~StoreWorker() {
  stop();
}

void StoreWorker::insert(NewJob job, InsertDone done) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!stopping_) {
      queue_.emplace_back(PendingInsert{std::move(job), std::move(done)});
      wakeup_.notify_one();
      return;
    }
  }
  // Through the loop like any other outcome, so the caller never sees `done` run inside
  // insert() and need not guard against re-entrance.
  post_to_loop_([done = std::move(done)]() mutable {
    done(std::string("job store is shut down: the job was not stored"));
  });
}

bool StoreWorker::run(Operation operation) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (stopping_) return false;
  queue_.emplace_back(std::move(operation));
  wakeup_.notify_one();
  return true;
}

void StoreWorker::stop() {
  // Joining itself would deadlock; worker_id_ is read instead of thread_, which join()
  // modifies under join_mutex_.
  if (std::this_thread::get_id() == worker_id_) {
    throw std::logic_error("StoreWorker::stop called from its own thread");
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wakeup_.notify_one();
  std::lock_guard<std::mutex> join_lock(join_mutex_);
  if (thread_.joinable()) thread_.join();
}

std::size_t StoreWorker::queue_depth() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return queue_.size();
}

void StoreWorker::thread_main() {
  // Named for top -H, ps -L and perf: the thread that runs the store's commits.
  pthread_setname_np(pthread_self(), "squall-store");
  // An insert arriving or a commit's fsync ending does not interrupt the loop's pass, and
  // the next commit takes everything the pass queued (group commit).
  squall::detail::schedule_as_background();
  std::vector<PendingInsert> batch;
  batch.reserve(max_batch);
  for (;;) {
    Operation operation;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wakeup_.wait(lock, [this] { return !queue_.empty() || stopping_; });
      if (queue_.empty()) return;  // Stopping, and everything queued has run.
      // Every insert waiting goes into one commit, also those queued behind operations: under
      // load the runner's claims and marks arrive between inserts, and ending the batch at
      // each would cost a commit apiece. Operations keep their order and run after the batch,
      // so each still sees every insert queued before it (and perhaps some queued later).
      for (auto item = queue_.begin(); item != queue_.end() && batch.size() < max_batch;) {
        if (auto* pending = std::get_if<PendingInsert>(&*item)) {
          batch.push_back(std::move(*pending));
          item = queue_.erase(item);
        } else {
          ++item;
        }
      }
      if (batch.empty()) {
        operation = std::move(std::get<Operation>(queue_.front()));
        queue_.pop_front();
      }
    }
    if (!batch.empty()) {
      commit_batch(batch);
      batch.clear();
    } else {
      run_operation(operation);
    }
  }
}

void StoreWorker::commit_batch(std::vector<PendingInsert>& batch) {
  std::vector<NewJob> jobs;
  jobs.reserve(batch.size());
  for (PendingInsert& pending : batch) jobs.push_back(std::move(pending.job));

  using Outcome = std::variant<Inserted, std::string>;
  std::vector<std::pair<InsertDone, Outcome>> outcomes;
  outcomes.reserve(batch.size());
  try {
    std::vector<Inserted> inserted = store_->insert_batch(std::move(jobs), unix_now_ms());
    if (inserted.size() != batch.size()) {
      throw std::logic_error("job store: insert_batch returned " + std::to_string(inserted.size()) +
                             " results for " + std::to_string(batch.size()) + " jobs");
    }
    batches_committed_.fetch_add(1, std::memory_order_relaxed);
    inserts_committed_.fetch_add(batch.size(), std::memory_order_relaxed);
    for (std::size_t i = 0; i < batch.size(); ++i) {
      outcomes.emplace_back(std::move(batch[i].done), Outcome(std::move(inserted[i])));
    }
  } catch (...) {
    const std::string error = current_error_text();
    outcomes.clear();
    for (PendingInsert& pending : batch) {
      outcomes.emplace_back(std::move(pending.done), Outcome(error));
    }
  }

  // One post per batch rather than one per insert: one lock and one wake-up of the loop.
  // Every `done` runs even if an earlier one throws; the first exception is then rethrown
  // for the loop to log.
  post_to_loop_([outcomes = std::move(outcomes)]() mutable {
    std::exception_ptr first_error;
    for (auto& [done, outcome] : outcomes) {
      try {
        done(std::move(outcome));
      } catch (...) {
        if (!first_error) first_error = current_as_std_exception();
      }
    }
    if (first_error) std::rethrow_exception(first_error);
  });
}

void StoreWorker::run_operation(Operation& operation) {
  try {
    operation(*store_);
  } catch (...) {
    // The worker must survive a failed operation; the loop's callback guard logs it. Only the
    // text crosses threads: an exception object shared through exception_ptr is freed by
    // whichever thread drops it last, behind a reference count the sanitizers cannot see.
    post_to_loop_([error = current_error_text()] { throw std::runtime_error(error); });
  }
}

}  // namespace squall::jobs

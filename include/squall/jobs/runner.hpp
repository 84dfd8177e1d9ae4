// Runs due jobs: claims them from the store with a lease, performs each on libuv's thread pool,
// and records the outcome (sent, retry later with backoff and jitter, or failed). Loop thread.
//
// The store sees the runner in rounds, one transaction (one commit) at a time: the attempts
// that began since the last round (start), the outcomes that came in (mark_sent, mark_retry,
// mark_failed, release), and a claim of the jobs due next (hold), as many as the free slots
// and the prefetch take. What arrives while a round commits waits for the next one (group
// commit). An outcome counts (stats, OnAttempt) only once its round committed.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "squall/core/loop.hpp"
#include "squall/core/uv_handle.hpp"
#include "squall/jobs/store.hpp"
#include "squall/jobs/store_worker.hpp"

namespace squall::jobs {

struct RunnerOptions {
  std::size_t max_concurrent = 2;                   // Jobs performed at once (pool threads).
  std::size_t max_attempts = 8;                     // Then a temporary failure is final.
  std::chrono::milliseconds retry_initial{30'000};  // The first backoff; it doubles.
  std::chrono::milliseconds retry_max{3'600'000};   // The backoff's cap.
  std::chrono::milliseconds lease{300'000};         // A claim's lifetime.
  std::chrono::milliseconds poll_interval{1'000};   // How often due jobs are looked for.
  // An outcome the store failed to record (locked, full, I/O error) is kept in memory and
  // written again after this wait, doubling up to record_retry_max, until it sticks.
  std::chrono::milliseconds record_retry_initial{100};
  std::chrono::milliseconds record_retry_max{5'000};
  // Jobs claimed beyond the free slots, waiting in memory for one, so that a claim (a commit)
  // serves many attempts. They are held, not started: the store shows them queued (or
  // retrying) until their attempt begins. Their holds run while they wait: one that waited
  // longer than half its lease goes back to the queue unattempted. The prefetch is topped up
  // once no more than half of it waits, so a claim takes at least half of it. 0: claim only
  // for free slots.
  std::size_t prefetch = 0;
  // How long starts and outcomes may wait before a round takes them, so that one commit (one
  // fsync) carries many (PostgreSQL's commit_delay). Not waited when a free slot has no job
  // (a claim is urgent then) nor while draining. 0: a round starts as soon as the last one
  // ended.
  std::chrono::milliseconds commit_delay{0};
  bool operator==(const RunnerOptions&) const = default;
};

// What one attempt came to.
struct AttemptResult {
  // aborted: cut short by abort_attempts() (shutdown); the job goes back to the queue as it
  // was, its attempt not counted.
  enum class Outcome { done, temporary_failure, permanent_failure, aborted };
  Outcome outcome;
  std::string detail;  // For the job's last_error and the log.
};

// Counters for metrics; loop thread only.
struct RunnerStats {
  std::uint64_t attempts = 0;       // Attempts started.
  std::uint64_t done = 0;           // Jobs finished successfully.
  std::uint64_t failed = 0;         // Jobs failed for good.
  std::uint64_t retries = 0;        // Attempts that ended in a scheduled retry.
  std::uint64_t running = 0;        // Attempts on the pool now.
  double last_attempt_seconds = 0;  // Duration of the latest attempt.
  std::uint64_t rounds = 0;         // Store transactions committed (claims and outcomes).
  std::uint64_t held = 0;           // Jobs claimed (held) by those rounds.
};

class JobRunner {
 public:
  // Turns a claimed job into the blocking work of one attempt; called on the loop thread, so it
  // may capture current settings. The work runs on a pool thread and must not touch the loop.
  using Prepare = std::function<std::function<AttemptResult()>(const Job&)>;
  // Called on the loop thread after each attempt, once its outcome is committed, with its
  // duration (for a histogram) and whether the job is finished (sent or failed for good)
  // rather than retried.
  using OnAttempt = std::function<void(const Job&, const AttemptResult&, std::chrono::nanoseconds,
                                       bool finished)>;

  JobRunner(Loop& loop, StoreWorker& store, RunnerOptions options, Prepare prepare,
            OnAttempt on_attempt = {});
  ~JobRunner();
  JobRunner(const JobRunner&) = delete;
  JobRunner& operator=(const JobRunner&) = delete;

  // Starts polling: the first claim also picks up jobs left by a previous run (expired leases).
  void start();
  // A job was just committed: look for work now instead of at the next poll.
  void poke();
  // Stops claiming; `done` runs once no attempt is running and every outcome is recorded.
  // Attempts not started stay queued.
  void drain(std::function<void()> done);
  // Asks running attempts to stop now (the work polls cancel_flag()); those that do end as
  // Outcome::aborted and their jobs are released. For the drain deadline.
  void abort_attempts();
  // Set by abort_attempts(); the work of an attempt may read it from its pool thread.
  std::shared_ptr<const std::atomic<bool>> cancel_flag() const { return cancel_; }
  void reconfigure(const RunnerOptions& options);

  const RunnerStats& stats() const noexcept { return stats_; }
  // Whether an attempt of job `id` is running now (its start may not be committed yet).
  bool attempting(const std::string& id) const { return running_ids_.count(id) != 0; }
  // The backoff before attempt `attempts + 1`: retry_initial * 2^(attempts-1), capped, with
  // "equal jitter" (a uniform draw from its upper half) so failed jobs do not retry in step.
  std::chrono::milliseconds backoff(int attempts);

 private:
  void claim();
  // Takes a claimed job into ready_, unless it is already being attempted or recorded.
  void enqueue(Job job);
  // Starts jobs from ready_ while slots are free.
  void start_ready();
  void perform(Job job);
  void finish_attempt(const Job& job, const AttemptResult& result,
                      std::chrono::nanoseconds elapsed);
  void maybe_drained();
  using Write = std::function<void(JobStore&, std::int64_t now_ms)>;
  // Writes to the store on its thread; drain waits until the write is committed. Writes that
  // arrive while one is being committed wait and then share one transaction (one commit for
  // many outcomes). A write that fails is tried again on its own (record_retry_initial,
  // doubling) until it sticks: a job whose outcome is not recorded yet is not attempted again,
  // even when its lease ends meanwhile.
  // `outcome`: the attempt is over and the job is not attempted again until this is written.
  // `committed` runs on the loop once it is.
  void record(const std::string& id, const char* what, Write write, bool outcome = true,
              std::function<void()> committed = {});
  // Starts a round if none is in flight and there is something to write or to claim.
  void flush_records();
  struct PendingWrite {
    std::string id;                   // The job's.
    const char* what;                 // For the log: "recording the outcome of", "releasing".
    Write write;                      // What to do in the store.
    bool outcome = true;              // The job is in recording_ids_ until this is written.
    std::function<void()> committed;  // Runs on the loop after the commit; may be empty.
  };
  void record_attempt(std::shared_ptr<PendingWrite> pending, int failures);
  void written(PendingWrite& pending);
  // Jobs the next claim should take: free slots plus the prefetch, less those waiting; none
  // while more than half the prefetch waits.
  std::size_t claim_wanted() const;

  Loop& loop_;                        // Whose pool and timers the runner uses.
  StoreWorker& store_;                // All store access goes through its thread.
  RunnerOptions options_;             // Current limits.
  Prepare prepare_;                   // Builds one attempt's work.
  OnAttempt on_attempt_;              // Metrics and logs hook.
  RunnerStats stats_;                 // Counters.
  std::mt19937_64 random_;            // For jitter.
  UvHandle<uv_timer_t> poll_timer_;   // Repeating poll; data -> this.
  bool claim_in_flight_ = false;      // The round in flight holds jobs.
  bool claim_again_ = false;          // A claim is wanted by the next round.
  bool nothing_due_ = false;          // The last claim found fewer than it asked for; until a poke.
  bool draining_ = false;             // No more claims.
  std::size_t marks_in_flight_ = 0;   // Outcome writes not yet committed.
  std::function<void()> on_drained_;  // drain()'s callback.
  std::unordered_set<std::string> running_ids_;    // Jobs with an attempt on the pool now.
  std::unordered_set<std::string> recording_ids_;  // Jobs whose outcome is not stored yet.
  // Claimed jobs waiting for a free slot (options_.prefetch), oldest first, with their claim's
  // time, and their ids.
  std::deque<std::pair<Job, std::chrono::steady_clock::time_point>> ready_;
  std::unordered_set<std::string> ready_ids_;
  std::vector<PendingWrite> unflushed_;  // Store writes waiting for the one in flight.
  bool flush_in_flight_ = false;         // A round is queued on the store.
  bool commit_delay_armed_ = false;      // A timer will start the next round (commit_delay).
  bool commit_delay_over_ = false;       // That timer fired: the next round starts now.
  std::shared_ptr<std::atomic<bool>> cancel_ =
      std::make_shared<std::atomic<bool>>(false);  // See abort_attempts().
  std::shared_ptr<bool> alive_;  // Lets store callbacks notice the runner is gone.
};

}  // namespace squall::jobs

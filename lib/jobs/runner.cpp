#include "squall/jobs/runner.hpp"

#include <algorithm>

#include <spdlog/spdlog.h>

namespace squall::jobs {

JobRunner::JobRunner(Loop& loop, StoreWorker& store, RunnerOptions options, Prepare prepare,
                     OnAttempt on_attempt)
    : loop_(loop),
      store_(store),
      options_(options),
      prepare_(std::move(prepare)),
      on_attempt_(std::move(on_attempt)),
      random_(std::random_device{}()),
      alive_(std::make_shared<bool>(true)) {}

JobRunner::~JobRunner() {
  *alive_ = false;
}

void JobRunner::start() {
  if (poll_timer_) return;
  poll_timer_ = UvHandle<uv_timer_t>(loop_, this, uv_timer_init, "job poll timer");
  const auto interval = static_cast<std::uint64_t>(options_.poll_interval.count());
  uv_timer_start(
      poll_timer_.get(), [](uv_timer_t* timer) { static_cast<JobRunner*>(timer->data)->poke(); }, 0,
      interval);
}

void JobRunner::reconfigure(const RunnerOptions& options) {
  options_ = options;
  if (poll_timer_.is_open()) {
    uv_timer_set_repeat(poll_timer_.get(),
                        static_cast<std::uint64_t>(options_.poll_interval.count()));
  }
}

void JobRunner::poke() {
  nothing_due_ = false;
  claim();
}

std::chrono::milliseconds JobRunner::backoff(int attempts) {
  const int doublings = std::clamp(attempts - 1, 0, 40);
  const double base = static_cast<double>(options_.retry_initial.count()) *
                      static_cast<double>(std::uint64_t{1} << std::min(doublings, 40));
  const double capped = std::min(base, static_cast<double>(options_.retry_max.count()));
  std::uniform_real_distribution<double> upper_half(capped / 2, capped);
  return std::chrono::milliseconds(static_cast<std::int64_t>(upper_half(random_)));
}

std::size_t JobRunner::claim_wanted() const {
  const std::size_t free_slots =
      options_.max_concurrent > stats_.running ? options_.max_concurrent - stats_.running : 0;
  const std::size_t wanted = free_slots + options_.prefetch;
  // Claims ahead come in batches: while more than half the prefetch still waits, the next
  // claim waits too. A claim costs the store a walk over the held jobs whatever it takes, so
  // topping the prefetch up after every send would cost one such walk per send.
  if (ready_.size() > free_slots + options_.prefetch / 2) return 0;
  return ready_.size() >= wanted ? 0 : wanted - ready_.size();
}

void JobRunner::claim() {
  start_ready();
  if (draining_) return;
  // The claim goes with the next round, together with the outcomes waiting for it; if a
  // round is in flight, that is when it returns.
  if (!nothing_due_ && claim_wanted() > 0) claim_again_ = true;
  flush_records();
}

void JobRunner::enqueue(Job job) {
  if (running_ids_.count(job.id) != 0 || recording_ids_.count(job.id) != 0 ||
      ready_ids_.count(job.id) != 0 || draining_) {
    perform(std::move(job));  // Which says why it does not attempt it.
    return;
  }
  ready_ids_.insert(job.id);
  ready_.emplace_back(std::move(job), std::chrono::steady_clock::now());
}

void JobRunner::start_ready() {
  while (!draining_ && stats_.running < options_.max_concurrent && !ready_.empty()) {
    auto [job, claimed_at] = std::move(ready_.front());
    ready_.pop_front();
    ready_ids_.erase(job.id);
    if (std::chrono::steady_clock::now() - claimed_at > options_.lease / 2) {
      // Half its lease is gone: the rest may not cover a whole attempt. Back to the queue,
      // uncounted, for a fresh claim.
      spdlog::info(
          "jobs: {} {} waited over half its lease ([jobs] lease) for a free slot; back "
          "in the queue",
          job.kind, job.id);
      record(job.id, "releasing",
             [id = job.id](JobStore& store, std::int64_t now) { store.release(id, now); });
      continue;
    }
    perform(std::move(job));
  }
}

void JobRunner::perform(Job job) {
  if (running_ids_.count(job.id) != 0) {
    // Our own attempt outlived its lease and the store handed the job out again: the attempt
    // still running will record the outcome.
    spdlog::warn("jobs: {} {} is still being attempted after its lease ([jobs] lease) ended",
                 job.kind, job.id);
    return;
  }
  if (ready_ids_.count(job.id) != 0) {
    // Claimed again (its lease ended) while it waits for a slot: it is attempted once, from
    // where it waits.
    spdlog::warn("jobs: {} {} was claimed again while it waits for a free slot", job.kind, job.id);
    return;
  }
  if (recording_ids_.count(job.id) != 0) {
    // Its attempt is over and the outcome (perhaps "sent") is still being written: attempting
    // it again would send it twice. The write in progress settles the job's state.
    spdlog::warn(
        "jobs: {} {} was claimed again while its outcome is being recorded: not "
        "attempted again",
        job.kind, job.id);
    return;
  }
  if (draining_) {
    // Claimed just before drain began: hand it back untouched for the next start.
    record(job.id, "releasing",
           [id = job.id](JobStore& store, std::int64_t now) { store.release(id, now); });
    return;
  }
  // The attempt begins: the store learns it with the next round (the job shows sending from
  // that commit on; until then attempting() says so). The attempt counts from now.
  ++job.attempts;
  job.state = JobState::sending;
  const std::int64_t lease_ms = options_.lease.count();
  job.lease_until_ms = unix_now_ms() + lease_ms;
  record(
      job.id, "recording the start of",
      [id = job.id, lease_ms](JobStore& store, std::int64_t now) {
        if (!store.start(id, now, lease_ms)) {
          spdlog::warn("jobs: {} was no longer waiting when its attempt began (its hold ended)",
                       id);
        }
      },
      false);
  std::function<AttemptResult()> work;
  try {
    work = prepare_(job);
  } catch (const std::exception& failure) {
    // A payload that cannot be turned into work will never succeed.
    finish_attempt(job,
                   {AttemptResult::Outcome::permanent_failure,
                    std::string("cannot prepare the job: ") + failure.what()},
                   std::chrono::nanoseconds(0));
    return;
  }
  ++stats_.attempts;
  ++stats_.running;
  running_ids_.insert(job.id);
  auto result = std::make_shared<AttemptResult>();
  const auto started = std::chrono::steady_clock::now();
  std::weak_ptr<bool> alive = alive_;
  loop_.run_blocking(
      [work = std::move(work), result] { *result = work(); },
      [this, alive, job = std::move(job), result, started](std::exception_ptr error) {
        const auto still_alive = alive.lock();
        if (!still_alive || !*still_alive) return;
        --stats_.running;
        running_ids_.erase(job.id);
        // A slot is free: the round that records this outcome also claims the next job.
        if (!draining_ && !nothing_due_) claim_again_ = true;
        if (error) {
          try {
            std::rethrow_exception(error);
          } catch (const std::exception& failure) {
            *result = {AttemptResult::Outcome::temporary_failure,
                       std::string("the attempt threw: ") + failure.what()};
          } catch (...) {
            *result = {AttemptResult::Outcome::temporary_failure, "the attempt threw"};
          }
        }
        finish_attempt(job, *result, std::chrono::steady_clock::now() - started);
        if (!draining_) claim();
      });
}

void JobRunner::finish_attempt(const Job& job, const AttemptResult& result,
                               std::chrono::nanoseconds elapsed) {
  if (result.outcome == AttemptResult::Outcome::aborted) {
    // Shutdown cut the attempt short: the job goes back to the queue untouched (attempts - 1),
    // for the next start. The relay may have taken the message just before the cut; then it
    // is sent again with the same Message-ID.
    spdlog::info("jobs: {} {} attempt {} aborted by shutdown ({}); back in the queue", job.kind,
                 job.id, job.attempts, result.detail);
    record(job.id, "releasing",
           [id = job.id](JobStore& store, std::int64_t now) { store.release(id, now); });
    return;
  }
  stats_.last_attempt_seconds = std::chrono::duration<double>(elapsed).count();
  enum class Mark { sent, retry, failed } mark = Mark::failed;
  std::string detail = result.detail;
  std::int64_t run_after_ms = 0;
  switch (result.outcome) {
    case AttemptResult::Outcome::done:
      mark = Mark::sent;
      spdlog::info("jobs: {} {} done after {} attempt(s)", job.kind, job.id, job.attempts);
      break;
    case AttemptResult::Outcome::permanent_failure:
      mark = Mark::failed;
      spdlog::warn("jobs: {} {} failed for good: {}", job.kind, job.id, detail);
      break;
    case AttemptResult::Outcome::temporary_failure:
      if (static_cast<std::size_t>(job.attempts) >= options_.max_attempts) {
        mark = Mark::failed;
        detail = "gave up after " + std::to_string(job.attempts) + " attempts: " + detail;
        spdlog::warn("jobs: {} {} {}", job.kind, job.id, detail);
      } else {
        mark = Mark::retry;
        const auto wait = backoff(job.attempts);
        run_after_ms = unix_now_ms() + wait.count();
        spdlog::info("jobs: {} {} attempt {} failed ({}); retrying in {} ms", job.kind, job.id,
                     job.attempts, detail, wait.count());
      }
      break;
    case AttemptResult::Outcome::aborted:
      break;  // Handled above.
  }
  // Counted and reported (metrics, the webhook's poke) only once the outcome is committed:
  // nothing is said to be sent that a crash could still take back.
  std::weak_ptr<bool> alive = alive_;
  auto committed = [this, alive, job, result, elapsed, mark] {
    const auto still_alive = alive.lock();
    if (!still_alive || !*still_alive) return;
    if (mark == Mark::sent) ++stats_.done;
    if (mark == Mark::failed) ++stats_.failed;
    if (mark == Mark::retry) ++stats_.retries;
    if (on_attempt_) on_attempt_(job, result, elapsed, mark != Mark::retry);
  };
  record(
      job.id, "recording the outcome of",
      [id = job.id, mark, detail, run_after_ms](JobStore& store, std::int64_t now) {
        if (mark == Mark::sent) store.mark_sent(id, now);
        if (mark == Mark::retry) store.mark_retry(id, detail, run_after_ms, now);
        if (mark == Mark::failed) store.mark_failed(id, detail, now);
      },
      true, std::move(committed));
}

void JobRunner::record(const std::string& id, const char* what, Write write, bool outcome,
                       std::function<void()> committed) {
  ++marks_in_flight_;
  if (outcome) recording_ids_.insert(id);
  unflushed_.push_back({id, what, std::move(write), outcome, std::move(committed)});
  flush_records();
}

void JobRunner::written(PendingWrite& pending) {
  if (pending.outcome) recording_ids_.erase(pending.id);
  --marks_in_flight_;
  if (pending.committed) pending.committed();
}

void JobRunner::flush_records() {
  if (flush_in_flight_) return;
  const std::size_t hold = draining_ || !claim_again_ ? 0 : claim_wanted();
  if (unflushed_.empty() && hold == 0) return;
  // A free slot without a job waiting makes the claim urgent, and so does an attempt that
  // began (the store shows it sending, and a restart after kill -9 counts it, as soon as
  // possible); outcomes and claims ahead may wait a little for more company in the commit.
  const bool starving = hold > 0 && ready_.empty() && stats_.running < options_.max_concurrent;
  const bool started = std::any_of(unflushed_.begin(), unflushed_.end(),
                                   [](const PendingWrite& pending) { return !pending.outcome; });
  if (options_.commit_delay.count() > 0 && !draining_ && !starving && !started &&
      !commit_delay_over_) {
    if (!commit_delay_armed_) {
      commit_delay_armed_ = true;
      std::weak_ptr<bool> alive = alive_;
      loop_.call_later(options_.commit_delay, [this, alive] {
        const auto still_alive = alive.lock();
        if (!still_alive || !*still_alive) return;
        commit_delay_armed_ = false;
        commit_delay_over_ = true;
        flush_records();
        commit_delay_over_ = false;
      });
    }
    return;
  }
  claim_again_ = false;
  auto batch = std::make_shared<std::vector<PendingWrite>>(std::move(unflushed_));
  unflushed_.clear();
  flush_in_flight_ = true;
  claim_in_flight_ = hold > 0;
  const std::int64_t lease_ms = options_.lease.count();
  std::weak_ptr<bool> alive = alive_;
  const bool queued =
      store_.run([this, alive, batch, hold, lease_ms, loop = loop_.remote()](JobStore& store) {
        std::string error;
        std::vector<Job> held;
        try {
          const std::int64_t now = unix_now_ms();
          store.transaction([&] {
            for (PendingWrite& pending : *batch) pending.write(store, now);
            if (hold > 0) held = store.hold(hold, now, lease_ms);
          });
        } catch (const std::exception& failure) {
          error = failure.what();
          held.clear();  // Rolled back with the rest.
        }
        loop.call_soon([this, alive, batch, hold, held = std::move(held), error]() mutable {
          const auto still_alive = alive.lock();
          if (!still_alive || !*still_alive) return;
          flush_in_flight_ = false;
          claim_in_flight_ = false;
          if (error.empty()) {
            ++stats_.rounds;
            stats_.held += held.size();
            for (PendingWrite& pending : *batch) written(pending);
          } else {
            if (hold > 0) spdlog::error("jobs: claiming due jobs failed: {}", error);
            // Nothing of the transaction stuck. Each write is tried again on its own, so that
            // one the store keeps refusing holds up no other.
            for (PendingWrite& pending : *batch) {
              spdlog::error("jobs: {} job {} failed: {}; trying again in {} ms", pending.what,
                            pending.id, error, options_.record_retry_initial.count());
              auto shared = std::make_shared<PendingWrite>(std::move(pending));
              loop_.call_later(options_.record_retry_initial, [this, alive, shared] {
                const auto again = alive.lock();
                if (!again || !*again) return;
                record_attempt(shared, 1);
              });
            }
          }
          for (Job& job : held) enqueue(std::move(job));
          start_ready();
          // A full claim means more may be waiting; a short one that none is, until a poke
          // (an insert) or the poll says otherwise.
          if (hold > 0 && error.empty()) nothing_due_ = held.size() < hold;
          if (!draining_ && hold > 0 && held.size() == hold) claim_again_ = true;
          flush_records();
          maybe_drained();
        });
      });
  if (!queued) {
    // The store thread is shut down: nothing can be recorded any more.
    flush_in_flight_ = false;
    claim_in_flight_ = false;
    for (const PendingWrite& pending : *batch) {
      spdlog::error("jobs: {} job {}: the job store is shut down; not recorded", pending.what,
                    pending.id);
      if (pending.outcome) recording_ids_.erase(pending.id);
      --marks_in_flight_;
    }
    maybe_drained();
  }
}

void JobRunner::record_attempt(std::shared_ptr<PendingWrite> pending, int failures) {
  std::weak_ptr<bool> alive = alive_;
  const bool queued =
      store_.run([this, alive, pending, failures, loop = loop_.remote()](JobStore& store) {
        std::string error;
        try {
          pending->write(store, unix_now_ms());
        } catch (const std::exception& failure) {
          error = failure.what();
        }
        loop.call_soon([this, alive, pending, failures, error] {
          const auto still_alive = alive.lock();
          if (!still_alive || !*still_alive) return;
          if (error.empty()) {
            if (failures > 0) {
              spdlog::info("jobs: {} job {} succeeded at the {}th try", pending->what, pending->id,
                           failures + 1);
            }
            written(*pending);
            maybe_drained();
            return;
          }
          // The fact stays here and is written again: were it dropped, the job would be attempted
          // again when its lease ends, and a sent email sent twice.
          const int doublings = std::min(failures, 20);
          const auto wait = std::min(options_.record_retry_initial * (std::int64_t{1} << doublings),
                                     options_.record_retry_max);
          spdlog::error("jobs: {} job {} failed: {}; trying again in {} ms", pending->what,
                        pending->id, error, wait.count());
          loop_.call_later(wait, [this, alive, pending, failures] {
            const auto again = alive.lock();
            if (!again || !*again) return;
            record_attempt(pending, failures + 1);
          });
        });
      });
  if (!queued) {
    // The store thread is shut down: nothing can be recorded any more.
    spdlog::error("jobs: {} job {}: the job store is shut down; not recorded", pending->what,
                  pending->id);
    if (pending->outcome) recording_ids_.erase(pending->id);
    --marks_in_flight_;
    maybe_drained();
  }
}

void JobRunner::abort_attempts() {
  cancel_->store(true, std::memory_order_relaxed);
}

void JobRunner::drain(std::function<void()> done) {
  draining_ = true;
  on_drained_ = std::move(done);
  if (poll_timer_.is_open()) uv_timer_stop(poll_timer_.get());
  // Jobs waiting for a slot go back to the queue untouched, for the next start.
  while (!ready_.empty()) {
    Job job = std::move(ready_.front().first);
    ready_.pop_front();
    ready_ids_.erase(job.id);
    record(job.id, "releasing",
           [id = job.id](JobStore& store, std::int64_t now) { store.release(id, now); });
  }
  maybe_drained();
}

void JobRunner::maybe_drained() {
  if (!draining_ || stats_.running > 0 || marks_in_flight_ > 0 || claim_in_flight_ ||
      !on_drained_) {
    return;
  }
  auto done = std::move(on_drained_);
  on_drained_ = nullptr;
  done();
}

}  // namespace squall::jobs

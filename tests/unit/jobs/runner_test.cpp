#include "squall/jobs/runner.hpp"
#include "core/handle_lifetime.hpp"
#include "test_support.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

using namespace squall;
using namespace std::chrono_literals;
using Outcome = jobs::AttemptResult::Outcome;

namespace {

// A temporary store, its worker thread, and a loop to run the runner on.
struct Fixture {
  using Wrap = std::function<std::unique_ptr<jobs::JobStore>(std::unique_ptr<jobs::JobStore>)>;
  // `wrap`, if given, stands between the worker and the SQLite store (to inject failures).
  explicit Fixture(const Wrap& wrap = {}) {
    auto sqlite = jobs::open_sqlite_store(directory.file("jobs.db"), false);
    store = std::make_unique<jobs::StoreWorker>(
        wrap ? wrap(std::move(sqlite)) : std::move(sqlite),
        [this](std::function<void()> callback) { loop.call_soon(std::move(callback)); });
  }
  ~Fixture() {
    store->stop();
    CHECK(loop.close() == 0);
  }
  // Inserts `count` jobs and runs the loop until they are committed.
  void insert(int count) {
    int done = 0;
    for (int i = 0; i < count; ++i) {
      store->insert(jobs::NewJob{"test", "payload-" + std::to_string(i), ""},
                    [&](std::variant<jobs::Inserted, std::string> outcome) {
                      CHECK(std::holds_alternative<jobs::Inserted>(outcome));
                      if (++done == count) loop.stop();
                    });
    }
    loop.run();
  }
  // Reads every job back through the worker.
  std::vector<jobs::Job> all_jobs(const std::vector<std::string>& ids) {
    std::vector<jobs::Job> found;
    store->run([&](jobs::JobStore& db) {
      for (const auto& id : ids) {
        if (auto job = db.get(id)) found.push_back(*job);
      }
      loop.call_soon([&] { loop.stop(); });
    });
    loop.run();
    return found;
  }

  testing::TempDir directory;  // Declared first: removed after the store closed its file.
  Loop loop;
  std::unique_ptr<jobs::StoreWorker> store;
};

// What the runner asked of the store (written on the store's thread, read after the run).
struct StoreCounts {
  int claims = 0;        // claim() calls
  int transactions = 0;  // transaction() calls
  int most_marks_in_a_transaction = 0;
  int marks_in_this_transaction = 0;  // while one runs
  int holds_beside_marks = 0;         // hold() calls in a transaction that marked jobs
  bool in_transaction = false;
  std::chrono::milliseconds slow_first_transaction{0};  // a commit that takes this long
  std::chrono::milliseconds slow_transactions{0};       // every commit takes this long (fsync)
};

// A store whose mark_sent fails (as a store locked by a backup does) while `fail_marks` > 0,
// and which counts calls into `counts` if given.
class FlakyStore final : public jobs::JobStore {
 public:
  FlakyStore(std::unique_ptr<jobs::JobStore> inner, std::atomic<int>& fail_marks,
             StoreCounts* counts = nullptr)
      : inner_(std::move(inner)), fail_marks_(fail_marks), counts_(counts) {}
  std::vector<jobs::Inserted> insert_batch(std::vector<jobs::NewJob> jobs,
                                           std::int64_t now_ms) override {
    return inner_->insert_batch(std::move(jobs), now_ms);
  }
  std::optional<jobs::Job> get(std::string_view id) override { return inner_->get(id); }
  std::vector<jobs::Job> claim(std::size_t max, std::int64_t now_ms,
                               std::int64_t lease_ms) override {
    if (counts_ != nullptr) ++counts_->claims;
    return inner_->claim(max, now_ms, lease_ms);
  }
  std::vector<jobs::Job> hold(std::size_t max, std::int64_t now_ms,
                              std::int64_t lease_ms) override {
    if (counts_ != nullptr) {
      ++counts_->claims;
      if (counts_->in_transaction && counts_->marks_in_this_transaction > 0) {
        ++counts_->holds_beside_marks;
      }
    }
    return inner_->hold(max, now_ms, lease_ms);
  }
  bool start(std::string_view id, std::int64_t now_ms, std::int64_t lease_ms) override {
    return inner_->start(id, now_ms, lease_ms);
  }
  bool mark_sent(std::string_view id, std::int64_t now_ms) override {
    if (counts_ != nullptr && counts_->in_transaction) ++counts_->marks_in_this_transaction;
    if (fail_marks_.load() > 0) {
      --fail_marks_;
      throw std::runtime_error("job store test.db: mark_sent: database is locked");
    }
    return inner_->mark_sent(id, now_ms);
  }
  bool mark_retry(std::string_view id, std::string_view error, std::int64_t run_after_ms,
                  std::int64_t now_ms) override {
    return inner_->mark_retry(id, error, run_after_ms, now_ms);
  }
  bool mark_failed(std::string_view id, std::string_view error, std::int64_t now_ms) override {
    return inner_->mark_failed(id, error, now_ms);
  }
  bool release(std::string_view id, std::int64_t now_ms) override {
    return inner_->release(id, now_ms);
  }
  std::int64_t count_pending() override { return inner_->count_pending(); }
  jobs::StoreStats stats(std::int64_t now_ms) override { return inner_->stats(now_ms); }
  void transaction(const std::function<void()>& body) override {
    if (counts_ == nullptr) return inner_->transaction(body);
    if (counts_->transactions++ == 0) std::this_thread::sleep_for(counts_->slow_first_transaction);
    std::this_thread::sleep_for(counts_->slow_transactions);
    counts_->in_transaction = true;
    counts_->marks_in_this_transaction = 0;
    inner_->transaction(body);
    counts_->in_transaction = false;
    counts_->most_marks_in_a_transaction =
        std::max(counts_->most_marks_in_a_transaction, counts_->marks_in_this_transaction);
  }
  std::size_t purge_finished(std::int64_t before_ms, std::size_t max_jobs) override {
    return inner_->purge_finished(before_ms, max_jobs);
  }
  std::int64_t compact(std::int64_t max_pages) override { return inner_->compact(max_pages); }
  std::size_t expire_all_leases(std::int64_t now_ms) override {
    return inner_->expire_all_leases(now_ms);
  }
  void probe_write(std::int64_t now_ms) override { inner_->probe_write(now_ms); }
  void set_webhooks(bool on) override { inner_->set_webhooks(on); }
  std::vector<jobs::Job> claim_webhooks(std::size_t max, std::int64_t now_ms,
                                        std::int64_t lease_ms) override {
    return inner_->claim_webhooks(max, now_ms, lease_ms);
  }
  bool mark_webhook(std::string_view id, jobs::WebhookState state, std::int64_t due_ms,
                    std::int64_t now_ms) override {
    return inner_->mark_webhook(id, state, due_ms, now_ms);
  }
  bool release_webhook(std::string_view id, std::int64_t now_ms) override {
    return inner_->release_webhook(id, now_ms);
  }
  std::int64_t count_webhooks_owed() override { return inner_->count_webhooks_owed(); }
  std::vector<jobs::OwnerUsage> pending_by_owner() override { return inner_->pending_by_owner(); }

 private:
  std::unique_ptr<jobs::JobStore> inner_;
  std::atomic<int>& fail_marks_;
  StoreCounts* counts_;
};

jobs::RunnerOptions fast_options() {
  jobs::RunnerOptions options;
  options.max_concurrent = 2;
  options.max_attempts = 3;
  options.retry_initial = 1ms;
  options.retry_max = 4ms;
  options.lease = 60s;
  options.poll_interval = 5ms;
  return options;
}

}  // namespace

TEST_CASE("the runner performs jobs, retries temporary failures and gives up after max_attempts") {
  Fixture fixture;
  fixture.insert(3);
  // payload-0 succeeds at once, payload-1 fails once then succeeds, payload-2 always fails
  // temporarily.
  std::mutex mutex;
  std::map<std::string, int> attempts_by_payload;
  std::vector<std::string> ids;
  int finished = 0;
  jobs::JobRunner runner(
      fixture.loop, *fixture.store, fast_options(),
      [&](const jobs::Job& job) -> std::function<jobs::AttemptResult()> {
        return [&, payload = job.payload] {
          std::lock_guard lock(mutex);
          const int attempt = ++attempts_by_payload[payload];
          if (payload == "payload-0") return jobs::AttemptResult{Outcome::done, "ok"};
          if (payload == "payload-1" && attempt == 2)
            return jobs::AttemptResult{Outcome::done, "ok"};
          return jobs::AttemptResult{Outcome::temporary_failure, "try later"};
        };
      },
      [&](const jobs::Job& job, const jobs::AttemptResult&, std::chrono::nanoseconds, bool done) {
        if (std::find(ids.begin(), ids.end(), job.id) == ids.end()) ids.push_back(job.id);
        if (done && ++finished == 3) fixture.loop.call_soon([&] { fixture.loop.stop(); });
      });
  runner.start();
  const auto watchdog = fixture.loop.call_later(10s, [&] { fixture.loop.stop(); });
  fixture.loop.run();
  fixture.loop.cancel(watchdog);
  REQUIRE(finished == 3);
  bool drained = false;
  runner.drain([&] {
    drained = true;
    fixture.loop.stop();
  });
  // Run even when drain() called back at once: its stop() then ends this run instead of
  // lingering and cutting short the next one (all_jobs' below).
  fixture.loop.run();
  CHECK(drained);
  CHECK(attempts_by_payload["payload-0"] == 1);
  CHECK(attempts_by_payload["payload-1"] == 2);
  CHECK(attempts_by_payload["payload-2"] == 3);
  CHECK(runner.stats().done == 2);
  CHECK(runner.stats().failed == 1);
  CHECK(runner.stats().retries == 3);
  for (const jobs::Job& job : fixture.all_jobs(ids)) {
    if (job.payload == "payload-2") {
      CHECK(job.state == jobs::JobState::failed);
      CHECK(job.last_error == "gave up after 3 attempts: try later");
    } else {
      CHECK(job.state == jobs::JobState::sent);
    }
  }
}

TEST_CASE("a permanent failure is final at once; at most max_concurrent attempts run together") {
  Fixture fixture;
  fixture.insert(6);
  std::atomic<int> running{0};
  std::atomic<int> most_running{0};
  int finished = 0;
  jobs::JobRunner runner(
      fixture.loop, *fixture.store, fast_options(),
      [&](const jobs::Job&) -> std::function<jobs::AttemptResult()> {
        return [&] {
          const int now = ++running;
          int seen = most_running.load();
          while (now > seen && !most_running.compare_exchange_weak(seen, now)) {
          }
          std::this_thread::sleep_for(20ms);
          --running;
          return jobs::AttemptResult{Outcome::permanent_failure, "550 no such user"};
        };
      },
      [&](const jobs::Job&, const jobs::AttemptResult&, std::chrono::nanoseconds, bool done) {
        CHECK(done);
        if (++finished == 6) fixture.loop.call_soon([&] { fixture.loop.stop(); });
      });
  runner.start();
  const auto watchdog = fixture.loop.call_later(10s, [&] { fixture.loop.stop(); });
  fixture.loop.run();
  fixture.loop.cancel(watchdog);
  CHECK(finished == 6);
  CHECK(most_running.load() == 2);
  CHECK(runner.stats().failed == 6);
  CHECK(runner.stats().retries == 0);
  runner.drain([&] { fixture.loop.stop(); });
  fixture.loop.run();
}

TEST_CASE("drain waits for the attempt in progress") {
  Fixture fixture;
  fixture.insert(1);
  bool attempt_finished = false;
  bool drained = false;
  jobs::JobRunner runner(
      fixture.loop, *fixture.store, fast_options(),
      [&](const jobs::Job&) -> std::function<jobs::AttemptResult()> {
        // The job is claimed and its attempt goes to the pool right after this returns: drain
        // then, on the next turn of the loop, while the attempt is in progress.
        fixture.loop.call_soon([&] {
          runner.drain([&] {
            drained = true;
            CHECK(attempt_finished);
            fixture.loop.stop();
          });
        });
        return [] {
          std::this_thread::sleep_for(50ms);
          return jobs::AttemptResult{Outcome::done, "ok"};
        };
      },
      [&](const jobs::Job&, const jobs::AttemptResult&, std::chrono::nanoseconds, bool) {
        attempt_finished = true;
      });
  runner.start();
  const auto watchdog = fixture.loop.call_later(10s, [&] { fixture.loop.stop(); });
  fixture.loop.run();
  fixture.loop.cancel(watchdog);
  CHECK(drained);
  CHECK(attempt_finished);
}

TEST_CASE("backoff doubles from retry_initial, is capped, and jitters within its upper half") {
  Fixture fixture;
  jobs::RunnerOptions options;
  options.retry_initial = 1000ms;
  options.retry_max = 10'000ms;
  jobs::JobRunner runner(fixture.loop, *fixture.store, options,
                         [](const jobs::Job&) { return std::function<jobs::AttemptResult()>(); });
  for (int i = 0; i < 50; ++i) {
    const auto first = runner.backoff(1).count();
    CHECK(first >= 500);
    CHECK(first <= 1000);
    const auto third = runner.backoff(3).count();
    CHECK(third >= 2000);
    CHECK(third <= 4000);
    const auto late = runner.backoff(30).count();
    CHECK(late >= 5000);
    CHECK(late <= 10'000);
  }
}

TEST_CASE("a claim of a job whose attempt is still running is ignored") {
  // The lease ends long before the attempt does, so every poll hands the job out again; the
  // runner must not start a second attempt of its own job.
  Fixture fixture;
  fixture.insert(1);
  auto options = fast_options();
  options.lease = 20ms;
  std::atomic<int> attempts{0};
  bool finished = false;
  jobs::JobRunner runner(
      fixture.loop, *fixture.store, options,
      [&](const jobs::Job&) -> std::function<jobs::AttemptResult()> {
        return [&] {
          ++attempts;
          std::this_thread::sleep_for(200ms);
          return jobs::AttemptResult{Outcome::done, "ok"};
        };
      },
      [&](const jobs::Job&, const jobs::AttemptResult&, std::chrono::nanoseconds, bool) {
        finished = true;
        fixture.loop.call_soon([&] { fixture.loop.stop(); });
      });
  runner.start();
  const auto watchdog = fixture.loop.call_later(10s, [&] { fixture.loop.stop(); });
  fixture.loop.run();
  fixture.loop.cancel(watchdog);
  CHECK(finished);
  CHECK(attempts == 1);
  CHECK(runner.stats().attempts == 1);
  runner.drain([&] { fixture.loop.stop(); });
  fixture.loop.run();
}

TEST_CASE("a sent outcome the store fails to record is kept and written again; no second send") {
  // The store refuses mark_sent four times (locked by a backup) for longer than the lease: the
  // job is claimed again meanwhile, and must not be attempted again.
  std::atomic<int> fail_marks{4};
  Fixture fixture([&](std::unique_ptr<jobs::JobStore> inner) {
    return std::make_unique<FlakyStore>(std::move(inner), fail_marks);
  });
  fixture.insert(1);
  auto options = fast_options();
  options.lease = 20ms;
  options.record_retry_initial = 15ms;
  std::atomic<int> attempts{0};
  std::string id;
  jobs::JobRunner runner(fixture.loop, *fixture.store, options,
                         [&](const jobs::Job& job) -> std::function<jobs::AttemptResult()> {
                           id = job.id;
                           return [&] {
                             ++attempts;
                             return jobs::AttemptResult{Outcome::done, "250 ok"};
                           };
                         });
  runner.start();
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  std::optional<jobs::Job> stored;
  while (std::chrono::steady_clock::now() < deadline) {
    fixture.loop.call_later(20ms, [&] { fixture.loop.stop(); });
    fixture.loop.run();
    if (id.empty()) continue;
    const auto found = fixture.all_jobs({id});
    if (!found.empty() && found[0].state == jobs::JobState::sent) {
      stored = found[0];
      break;
    }
  }
  REQUIRE(stored.has_value());
  CHECK(fail_marks.load() == 0);
  CHECK(attempts.load() == 1);
  CHECK(runner.stats().attempts == 1);
  runner.drain([&] { fixture.loop.stop(); });
  fixture.loop.run();
}

TEST_CASE("abort_attempts ends running attempts; their jobs go back to the queue uncounted") {
  Fixture fixture;
  fixture.insert(1);
  std::atomic<bool> started{false};
  std::string id;
  jobs::JobRunner* self = nullptr;
  jobs::JobRunner runner(fixture.loop, *fixture.store, fast_options(),
                         [&](const jobs::Job& job) -> std::function<jobs::AttemptResult()> {
                           id = job.id;
                           return [&started, cancel = self->cancel_flag()] {
                             started = true;
                             // A send that would take a minute, polling the flag as libcurl's
                             // progress callback does.
                             for (int i = 0; i < 60'000 && !cancel->load(); ++i)
                               std::this_thread::sleep_for(1ms);
                             if (cancel->load())
                               return jobs::AttemptResult{Outcome::aborted, "aborted"};
                             return jobs::AttemptResult{Outcome::done, "ok"};
                           };
                         });
  self = &runner;
  runner.start();
  bool drained = false;
  const auto begun = std::chrono::steady_clock::now();
  fixture.loop.call_later(50ms, [&] {
    CHECK(started.load());
    runner.drain([&] {
      drained = true;
      fixture.loop.stop();
    });
    runner.abort_attempts();
  });
  const auto watchdog = fixture.loop.call_later(10s, [&] { fixture.loop.stop(); });
  fixture.loop.run();
  fixture.loop.cancel(watchdog);
  CHECK(drained);
  CHECK(std::chrono::steady_clock::now() - begun < 5s);
  const auto found = fixture.all_jobs({id});
  REQUIRE(found.size() == 1);
  CHECK(found[0].state == jobs::JobState::queued);
  CHECK(found[0].attempts == 0);
  CHECK(runner.stats().done == 0);
  CHECK(runner.stats().failed == 0);
}

// Runs `runner` until `finished` reaches `count` (or a 10 s watchdog), then drains it.
void run_until(Fixture& fixture, jobs::JobRunner& runner, const int& finished, int count) {
  runner.start();
  const auto watchdog = fixture.loop.call_later(10s, [&] { fixture.loop.stop(); });
  const auto poll = fixture.loop.call_every(1ms, [&] {
    if (finished >= count) fixture.loop.stop();
  });
  fixture.loop.run();
  fixture.loop.cancel(watchdog);
  fixture.loop.cancel(poll);
  runner.drain([&] { fixture.loop.stop(); });
  fixture.loop.run();
}

TEST_CASE("prefetch: one claim serves many attempts; outcomes share a transaction") {
  std::atomic<int> no_failures{0};
  StoreCounts counts;
  counts.slow_first_transaction = 50ms;  // the outcomes after the first pile up meanwhile
  Fixture fixture([&](std::unique_ptr<jobs::JobStore> inner) {
    return std::make_unique<FlakyStore>(std::move(inner), no_failures, &counts);
  });
  fixture.insert(20);
  auto options = fast_options();
  options.max_concurrent = 1;
  options.prefetch = 32;
  options.poll_interval = 10s;  // only the first claim and the runner's own
  int finished = 0;
  std::atomic<int> performed{0};
  jobs::JobRunner runner(
      fixture.loop, *fixture.store, options,
      [&](const jobs::Job&) -> std::function<jobs::AttemptResult()> {
        return [&] {
          ++performed;
          return jobs::AttemptResult{Outcome::done, "250 ok"};
        };
      },
      [&](const jobs::Job&, const jobs::AttemptResult&, std::chrono::nanoseconds, bool) {
        ++finished;
      });
  run_until(fixture, runner, finished, 20);
  CHECK(finished == 20);
  CHECK(performed.load() == 20);
  CHECK(runner.stats().done == 20);
  // One claim took all 20 (plus perhaps one that found none left); without prefetch each
  // attempt needed its own.
  CHECK(counts.claims <= 3);
  // The outcomes that finished during the slow first commit were written in one transaction.
  CHECK(counts.most_marks_in_a_transaction > 1);
}

TEST_CASE("prefetch: claims ahead come in batches of at least half the prefetch") {
  std::atomic<int> no_failures{0};
  StoreCounts counts;
  Fixture fixture([&](std::unique_ptr<jobs::JobStore> inner) {
    return std::make_unique<FlakyStore>(std::move(inner), no_failures, &counts);
  });
  fixture.insert(64);
  auto options = fast_options();
  options.max_concurrent = 1;
  options.prefetch = 16;
  options.poll_interval = 10s;  // only the first claim and the runner's own
  int finished = 0;
  jobs::JobRunner runner(
      fixture.loop, *fixture.store, options,
      [&](const jobs::Job&) -> std::function<jobs::AttemptResult()> {
        return [] {
          // Longer than a commit here: each send's start and outcome take rounds of their own.
          std::this_thread::sleep_for(1ms);
          return jobs::AttemptResult{Outcome::done, "250 ok"};
        };
      },
      [&](const jobs::Job&, const jobs::AttemptResult&, std::chrono::nanoseconds, bool) {
        ++finished;
      });
  run_until(fixture, runner, finished, 64);
  CHECK(finished == 64);
  CHECK(runner.stats().done == 64);
  CHECK(runner.stats().held == 64);
  // At most one claim per 8 sends (half the prefetch), plus the first and the last that finds
  // nothing; topping the prefetch up in every round took one per round, about one per send.
  CHECK(counts.claims <= 64 / 8 + 3);
}

TEST_CASE("prefetch: a job that waited over half its lease goes back instead of starting") {
  Fixture fixture;
  fixture.insert(3);
  auto options = fast_options();
  options.max_concurrent = 1;
  options.prefetch = 8;
  options.lease = 400ms;
  options.poll_interval = 20ms;
  int finished = 0;
  std::mutex mutex;
  std::map<std::string, int> attempts_by_id;
  std::vector<std::int64_t> lease_left_ms;  // at each start
  jobs::JobRunner runner(
      fixture.loop, *fixture.store, options,
      [&](const jobs::Job& job) -> std::function<jobs::AttemptResult()> {
        lease_left_ms.push_back(job.lease_until_ms - jobs::unix_now_ms());
        const bool first = attempts_by_id.empty();
        return [&, first, id = job.id] {
          {
            std::lock_guard lock(mutex);
            ++attempts_by_id[id];
          }
          // The first attempt outlasts half the lease of the jobs claimed with it.
          if (first) std::this_thread::sleep_for(300ms);
          return jobs::AttemptResult{Outcome::done, "250 ok"};
        };
      },
      [&](const jobs::Job&, const jobs::AttemptResult&, std::chrono::nanoseconds, bool) {
        ++finished;
      });
  run_until(fixture, runner, finished, 3);
  CHECK(finished == 3);
  CHECK(attempts_by_id.size() == 3);
  for (const auto& [id, attempts] : attempts_by_id) CHECK(attempts == 1);
  // Every attempt started with at least half its lease ahead (less a little for the clock).
  REQUIRE(lease_left_ms.size() == 3);
  for (const std::int64_t left : lease_left_ms) CHECK(left >= 180);
  std::vector<std::string> ids;
  for (const auto& entry : attempts_by_id) ids.push_back(entry.first);
  for (const jobs::Job& job : fixture.all_jobs(ids)) {
    CHECK(job.state == jobs::JobState::sent);
    CHECK(job.attempts == 1);  // the releases handed the claims back uncounted
  }
}

TEST_CASE("the runner's poll timer is closed once, whether the runner or its loop ends first") {
  // Destroying a started runner after Loop::close() closed its timer a second time before.
  testing::TempDir directory;
  struct Started {
    std::unique_ptr<jobs::StoreWorker> store;
    std::unique_ptr<jobs::JobRunner> runner;
    ~Started() {
      runner.reset();
      store->stop();
    }
  };
  testing::check_every_end_order([&](Loop& loop) {
    auto started = std::make_unique<Started>();
    started->store = std::make_unique<jobs::StoreWorker>(
        jobs::open_sqlite_store(directory.file("jobs.db"), false),
        [remote = loop.remote()](std::function<void()> callback) {
          remote.call_soon(std::move(callback));
        });
    started->runner = std::make_unique<jobs::JobRunner>(
        loop, *started->store, fast_options(),
        [](const jobs::Job&) -> std::function<jobs::AttemptResult()> {
          return [] { return jobs::AttemptResult{Outcome::done, "ok"}; };
        },
        [](const jobs::Job&, const jobs::AttemptResult&, std::chrono::nanoseconds, bool) {});
    started->runner->start();
    return started;
  });
}

TEST_CASE("prefetch: a job held ahead of its attempt shows queued, not sending, until it starts") {
  Fixture fixture;
  fixture.insert(3);
  auto options = fast_options();
  options.max_concurrent = 1;
  options.prefetch = 4;
  options.poll_interval = 10s;
  std::atomic<bool> release_first{false};
  std::atomic<int> performed{0};
  std::vector<std::string> started;  // loop thread
  int finished = 0;
  jobs::JobRunner runner(
      fixture.loop, *fixture.store, options,
      [&](const jobs::Job& job) -> std::function<jobs::AttemptResult()> {
        started.push_back(job.id);
        return [&] {
          if (performed++ == 0) {
            while (!release_first.load()) std::this_thread::sleep_for(1ms);
          }
          return jobs::AttemptResult{Outcome::done, "250 ok"};
        };
      },
      [&](const jobs::Job&, const jobs::AttemptResult&, std::chrono::nanoseconds, bool) {
        ++finished;
      });
  runner.start();
  // Until the first attempt's start is committed and the others are held.
  std::vector<jobs::Job> seen;
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (std::chrono::steady_clock::now() < deadline) {
    fixture.loop.call_later(5ms, [&] { fixture.loop.stop(); });
    fixture.loop.run();
    if (started.empty()) continue;
    seen = fixture.all_jobs({started[0]});
    if (!seen.empty() && seen[0].state == jobs::JobState::sending) break;
  }
  REQUIRE(started.size() == 1);
  REQUIRE(seen.size() == 1);
  CHECK(seen[0].state == jobs::JobState::sending);
  CHECK(seen[0].attempts == 1);
  CHECK(runner.attempting(started[0]));
  // The other two are held by this runner: still waiting, as the store shows them.
  int held = 0;
  fixture.store->run([&](jobs::JobStore& db) {
    const auto stats = db.stats(jobs::unix_now_ms());
    held = static_cast<int>(stats.by_state[static_cast<std::size_t>(jobs::JobState::queued)]);
    CHECK(stats.by_state[static_cast<std::size_t>(jobs::JobState::sending)] == 1);
    // Held, not free: a claim by another runner gets none of them.
    CHECK(db.claim(10, jobs::unix_now_ms(), 60'000).empty());
    fixture.loop.call_soon([&] { fixture.loop.stop(); });
  });
  fixture.loop.run();
  CHECK(held == 2);
  release_first = true;
  run_until(fixture, runner, finished, 3);
  CHECK(finished == 3);
  CHECK(performed.load() == 3);
  REQUIRE(started.size() == 3);
  for (const jobs::Job& job : fixture.all_jobs(started)) {
    CHECK(job.state == jobs::JobState::sent);
    CHECK(job.attempts == 1);
  }
}

TEST_CASE("an outcome counts, and is reported, only once its commit stuck") {
  // The store refuses mark_sent three times: neither the sent counter nor on_attempt may say
  // "sent" before the fourth try commits.
  std::atomic<int> fail_marks{3};
  Fixture fixture([&](std::unique_ptr<jobs::JobStore> inner) {
    return std::make_unique<FlakyStore>(std::move(inner), fail_marks);
  });
  fixture.insert(1);
  auto options = fast_options();
  options.record_retry_initial = 10ms;
  int finished = 0;
  int failures_left_when_reported = -1;
  std::uint64_t done_while_failing = 0;
  jobs::JobRunner* self = nullptr;
  jobs::JobRunner runner(
      fixture.loop, *fixture.store, options,
      [&](const jobs::Job&) -> std::function<jobs::AttemptResult()> {
        return [] { return jobs::AttemptResult{Outcome::done, "250 ok"}; };
      },
      [&](const jobs::Job&, const jobs::AttemptResult&, std::chrono::nanoseconds, bool done) {
        CHECK(done);
        failures_left_when_reported = fail_marks.load();
        ++finished;
      });
  self = &runner;
  const auto poll = fixture.loop.call_every(1ms, [&] {
    if (fail_marks.load() > 0)
      done_while_failing = std::max(done_while_failing, self->stats().done);
  });
  run_until(fixture, runner, finished, 1);
  fixture.loop.cancel(poll);
  CHECK(finished == 1);
  CHECK(failures_left_when_reported == 0);
  CHECK(done_while_failing == 0);
  CHECK(runner.stats().done == 1);
}

TEST_CASE("rounds: the claim of the next jobs shares the commit of the outcomes before it") {
  std::atomic<int> no_failures{0};
  StoreCounts counts;
  counts.slow_transactions = 5ms;  // a disk's fsync: several sends finish during each commit
  Fixture fixture([&](std::unique_ptr<jobs::JobStore> inner) {
    return std::make_unique<FlakyStore>(std::move(inner), no_failures, &counts);
  });
  fixture.insert(40);
  auto options = fast_options();
  options.max_concurrent = 2;
  options.prefetch = 4;  // fewer than the jobs: claims keep coming while outcomes are recorded
  options.poll_interval = 10s;
  int finished = 0;
  jobs::JobRunner runner(
      fixture.loop, *fixture.store, options,
      [&](const jobs::Job&) -> std::function<jobs::AttemptResult()> {
        return [] {
          std::this_thread::sleep_for(1ms);
          return jobs::AttemptResult{Outcome::done, "250 ok"};
        };
      },
      [&](const jobs::Job&, const jobs::AttemptResult&, std::chrono::nanoseconds, bool) {
        ++finished;
      });
  run_until(fixture, runner, finished, 40);
  CHECK(finished == 40);
  CHECK(runner.stats().done == 40);
  // Claims rode along with outcomes rather than taking commits of their own, and every
  // commit the runner made is one transaction: fewer than one per send, where claims and
  // marks apart took at least two.
  CHECK(counts.holds_beside_marks > 0);
  CHECK(runner.stats().rounds < 40);
  CHECK(runner.stats().held == 40);
}

TEST_CASE("commit_delay: outcomes gather for it and share a few commits; starts do not wait") {
  StoreCounts counts;
  Fixture fixture([&](std::unique_ptr<jobs::JobStore> inner) {
    static std::atomic<int> no_failures{0};
    return std::make_unique<FlakyStore>(std::move(inner), no_failures, &counts);
  });
  fixture.insert(30);
  auto options = fast_options();
  options.max_concurrent = 30;  // every job starts at once; then only outcomes come in
  options.prefetch = 0;
  options.poll_interval = 10s;
  options.commit_delay = 200ms;  // far longer than the sends take
  int finished = 0;
  std::atomic<int> sent{0};
  jobs::JobRunner runner(
      fixture.loop, *fixture.store, options,
      [&](const jobs::Job&) -> std::function<jobs::AttemptResult()> {
        return [&] {
          // The outcomes come in one after another, over about 30 ms.
          std::this_thread::sleep_for(std::chrono::milliseconds(sent++));
          return jobs::AttemptResult{Outcome::done, "250 ok"};
        };
      },
      [&](const jobs::Job&, const jobs::AttemptResult&, std::chrono::nanoseconds, bool) {
        ++finished;
      });
  const auto begun = std::chrono::steady_clock::now();
  run_until(fixture, runner, finished, 30);
  CHECK(finished == 30);
  CHECK(runner.stats().done == 30);
  // The claim, the starts (not delayed: a round as soon as the last one ended), then the 30
  // outcomes together after the delay; without it they took a round each or nearly.
  CHECK(counts.most_marks_in_a_transaction >= 20);
  CHECK(std::chrono::steady_clock::now() - begun >= 200ms - 2ms);  // Timers: the loop's ms clock.
}

#include "squall/jobs/store.hpp"
#include "squall/jobs/store_worker.hpp"
#include "store_backends.hpp"
#include "test_support.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <type_traits>

#include <sched.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using squall::jobs::Inserted;
using squall::jobs::Job;
using squall::jobs::JobState;
using squall::jobs::JobStore;
using squall::jobs::NewJob;
using squall::jobs::open_sqlite_store;
using squall::jobs::StoreWorker;
using squall::testing::PostgresBackend;
using squall::testing::SqliteBackend;
using squall::testing::TempDir;

namespace {

NewJob new_job(std::string payload, std::string key = "") {
  return NewJob{"email", std::move(payload), std::move(key)};
}

Inserted insert_one(JobStore& store, NewJob job, std::int64_t now_ms) {
  auto results = store.insert_batch({std::move(job)}, now_ms);
  REQUIRE(results.size() == 1);
  return results[0];
}

std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const std::exception& error) {
    return error.what();
  }
  return "";
}

// Runs raw SQL on the store's file, for setting up what the API cannot (triggers, versions).
void run_sql(const std::string& path, const char* sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  char* error = nullptr;
  const int status = sqlite3_exec(db, sql, nullptr, nullptr, &error);
  INFO((error != nullptr ? error : ""));
  sqlite3_free(error);
  sqlite3_close(db);
  REQUIRE(status == SQLITE_OK);
}

// A stand-in for the loop: callbacks posted from any thread run when the test drains them,
// on the test's own thread.
class FakeLoop {
 public:
  StoreWorker::PostToLoop poster() {
    return [this](std::function<void()> callback) {
      std::lock_guard<std::mutex> lock(mutex_);
      pending_.push_back(std::move(callback));
      changed_.notify_all();
    };
  }
  // Runs what is pending; returns how many ran. Exceptions are counted, as the loop logs them.
  std::size_t drain() {
    std::vector<std::function<void()>> running;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      running.swap(pending_);
    }
    for (auto& callback : running) {
      try {
        callback();
      } catch (const std::exception& error) {
        errors.push_back(error.what());
      }
    }
    return running.size();
  }
  // Drains until `done()` holds or five seconds pass.
  bool drain_until(const std::function<bool()>& done) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!done()) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait_until(
            lock,
            std::min(deadline, std::chrono::steady_clock::now() + std::chrono::milliseconds(10)),
            [this] { return !pending_.empty(); });
      }
      drain();
      if (std::chrono::steady_clock::now() > deadline) return done();
    }
    return true;
  }
  std::vector<std::string> errors;  // What callbacks threw.

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<std::function<void()>> pending_;
};

}  // namespace

TEST_CASE("job states convert to and from text") {
  for (JobState state : {JobState::queued, JobState::sending, JobState::retrying, JobState::sent,
                         JobState::failed}) {
    CHECK(squall::jobs::parse_job_state(squall::jobs::to_string(state)) == state);
  }
  CHECK(squall::jobs::to_string(JobState::retrying) == "retrying");
  CHECK_FALSE(squall::jobs::parse_job_state("Queued").has_value());
  CHECK_FALSE(squall::jobs::parse_job_state("").has_value());
}

TEST_CASE("job ids are 32 lowercase hex digits and differ") {
  std::set<std::string> ids;
  for (int i = 0; i < 1000; ++i) {
    const std::string id = squall::jobs::new_job_id();
    REQUIRE(id.size() == 32);
    CHECK(id.find_first_not_of("0123456789abcdef") == std::string::npos);
    ids.insert(id);
  }
  CHECK(ids.size() == 1000);
}

TEST_CASE_TEMPLATE("ids lead with their creation time in milliseconds, also from insert_batch",
                   Backend, SqliteBackend, PostgresBackend) {
  // Time-ordered ids keep a batch's index entries on few pages: the durable-accept benchmark
  // depends on it, so both ways of making an id are held to it.
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(false);
  const std::int64_t now = 1'790'000'000'123;
  const auto inserted = store->insert_batch({new_job("a"), new_job("b")}, now);
  const auto leading_ms = [](const std::string& id) {
    return static_cast<std::int64_t>(std::stoull(id.substr(0, 12), nullptr, 16));
  };
  REQUIRE(inserted.size() == 2);
  CHECK(leading_ms(inserted[0].job.id) == now);
  CHECK(leading_ms(inserted[1].job.id) == now);
  CHECK(inserted[0].job.id != inserted[1].job.id);
  const std::int64_t before = squall::jobs::unix_now_ms();
  const std::int64_t made = leading_ms(squall::jobs::new_job_id());
  CHECK(made >= before);
  CHECK(made <= squall::jobs::unix_now_ms());
}

TEST_CASE_TEMPLATE("an inserted job reads back with every field", Backend, SqliteBackend,
                   PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(true);
  std::string payload = "{\"to\":\"a@example.com\"}";
  payload.push_back('\0');  // Payloads are bytes.
  payload += "tail";
  const Inserted inserted = insert_one(*store, NewJob{"email", payload, ""}, 1000);
  CHECK(inserted.created);
  CHECK(inserted.job.id.size() == 32);
  CHECK(inserted.job.state == JobState::queued);
  CHECK(inserted.job.created_ms == 1000);
  CHECK(inserted.job.run_after_ms == 1000);

  const auto job = store->get(inserted.job.id);
  REQUIRE(job.has_value());
  CHECK(job->id == inserted.job.id);
  CHECK(job->kind == "email");
  CHECK(job->state == JobState::queued);
  CHECK(job->payload == payload);
  CHECK(job->idempotency_key.empty());
  CHECK(job->attempts == 0);
  CHECK(job->last_error.empty());
  CHECK(job->created_ms == 1000);
  CHECK(job->updated_ms == 1000);
  CHECK(job->run_after_ms == 1000);
  CHECK(job->lease_until_ms == 0);
  CHECK(job->finished_ms == 0);

  CHECK_FALSE(store->get("0123456789abcdef0123456789abcdef").has_value());
  CHECK_FALSE(store->get("").has_value());
  CHECK(store->insert_batch({}, 1000).empty());
}

TEST_CASE_TEMPLATE("an idempotency key returns the existing job, across and within batches",
                   Backend, SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(false);
  const Inserted first = insert_one(*store, new_job("one", "key-1"), 1000);
  CHECK(first.created);

  SUBCASE("in a later batch, even with another payload") {
    const Inserted again = insert_one(*store, new_job("different", "key-1"), 2000);
    CHECK_FALSE(again.created);
    CHECK(again.job.id == first.job.id);
    CHECK(again.job.payload == "one");
    CHECK(again.job.created_ms == 1000);
  }
  SUBCASE("within one batch") {
    auto results =
        store->insert_batch({new_job("a", "key-2"), new_job("b", ""), new_job("c", "key-2"),
                             new_job("d", "key-1"), new_job("e", "")},
                            3000);
    REQUIRE(results.size() == 5);
    CHECK(results[0].created);
    CHECK(results[1].created);
    CHECK_FALSE(results[2].created);
    CHECK(results[2].job.id == results[0].job.id);
    CHECK(results[2].job.payload == "a");
    CHECK_FALSE(results[3].created);
    CHECK(results[3].job.id == first.job.id);
    CHECK(results[4].created);
    CHECK(results[4].job.id != results[1].job.id);  // Empty keys never collide.
    CHECK(store->count_pending() == 4);
  }
}

TEST_CASE_TEMPLATE("claim takes due jobs oldest first, up to max, with a lease", Backend,
                   SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(false);
  const Job late = insert_one(*store, new_job("late"), 3000).job;
  const auto early = store->insert_batch({new_job("early-1"), new_job("early-2")}, 1000);
  const Job future = insert_one(*store, new_job("future"), 9000).job;

  const auto claimed = store->claim(2, 5000, 60'000);
  REQUIRE(claimed.size() == 2);
  CHECK(claimed[0].id == early[0].job.id);  // Same run_after: insertion order.
  CHECK(claimed[1].id == early[1].job.id);
  for (const Job& job : claimed) {
    CHECK(job.state == JobState::sending);
    CHECK(job.attempts == 1);
    CHECK(job.lease_until_ms == 65'000);
    CHECK(job.updated_ms == 5000);
  }
  CHECK(store->get(early[0].job.id)->state == JobState::sending);

  const auto rest = store->claim(10, 5000, 60'000);
  REQUIRE(rest.size() == 1);
  CHECK(rest[0].id == late.id);  // `future` is not due yet.
  CHECK(store->claim(10, 5000, 60'000).empty());
  CHECK(store->claim(10, 9000, 60'000).at(0).id == future.id);
  CHECK(store->claim(0, 9000, 60'000).empty());
  CHECK_THROWS_AS(store->claim(1, 9000, 0), std::invalid_argument);
}

TEST_CASE_TEMPLATE("an expired lease is claimed again; a live one is not", Backend, SqliteBackend,
                   PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(false);
  const Job job = insert_one(*store, new_job("x"), 1000).job;
  REQUIRE(store->claim(10, 1000, 5000).size() == 1);  // lease_until = 6000

  CHECK(store->claim(10, 5999, 5000).empty());
  CHECK(store->claim(10, 6000, 5000).empty());  // Expired means lease_until < now.
  const auto again = store->claim(10, 6001, 5000);
  REQUIRE(again.size() == 1);
  CHECK(again[0].id == job.id);
  CHECK(again[0].attempts == 2);
  CHECK(again[0].lease_until_ms == 11'001);
  CHECK(store->claim(10, 11'000, 5000).empty());
}

TEST_CASE_TEMPLATE("claim orders expired leases, retries and new jobs by run_after, then age",
                   Backend, SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(false);
  const Job stuck = insert_one(*store, new_job("stuck"), 1000).job;
  REQUIRE(store->claim(1, 1000, 1000).size() == 1);  // Its lease ends at 2000.
  const Job retried = insert_one(*store, new_job("retried"), 1500).job;
  REQUIRE(store->claim(1, 1500, 100).size() == 1);
  REQUIRE(store->mark_retry(retried.id, "later", 2000, 1500));
  const Job fresh = insert_one(*store, new_job("fresh"), 2000).job;  // Due at 2000 as well.
  const Job newer = insert_one(*store, new_job("newer"), 2500).job;

  const auto claimed = store->claim(10, 3000, 100);
  REQUIRE(claimed.size() == 4);
  CHECK(claimed[0].id == stuck.id);    // run_after 1000, lease expired.
  CHECK(claimed[1].id == retried.id);  // run_after 2000, created 1500.
  CHECK(claimed[2].id == fresh.id);    // run_after 2000, created 2000.
  CHECK(claimed[3].id == newer.id);
  CHECK(claimed[0].attempts == 2);
  CHECK(claimed[1].attempts == 2);
  CHECK(claimed[2].attempts == 1);
}

TEST_CASE_TEMPLATE("mark_sent, mark_retry, mark_failed and release move a claimed job", Backend,
                   SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(false);
  const auto batch =
      store->insert_batch({new_job("a"), new_job("b"), new_job("c"), new_job("d")}, 1000);
  REQUIRE(store->claim(10, 2000, 60'000).size() == 4);
  const std::string a = batch[0].job.id, b = batch[1].job.id, c = batch[2].job.id,
                    d = batch[3].job.id;

  CHECK(store->mark_sent(a, 3000));
  auto job = store->get(a);
  CHECK(job->state == JobState::sent);
  CHECK(job->finished_ms == 3000);
  CHECK(job->updated_ms == 3000);
  CHECK(job->lease_until_ms == 0);
  CHECK_FALSE(store->mark_sent(a, 3500));  // Already sent.
  CHECK_FALSE(store->mark_retry(a, "late", 9000, 3500));
  CHECK(store->get(a)->finished_ms == 3000);

  CHECK(store->mark_retry(b, "421 try later", 10'000, 3000));
  job = store->get(b);
  CHECK(job->state == JobState::retrying);
  CHECK(job->last_error == "421 try later");
  CHECK(job->run_after_ms == 10'000);
  CHECK(job->lease_until_ms == 0);
  CHECK(job->finished_ms == 0);
  CHECK(job->updated_ms == 3000);
  CHECK_FALSE(store->mark_failed(b, "stale sender", 3500));  // Not sending any more.
  CHECK(store->claim(10, 9999, 60'000).empty());
  const auto retried = store->claim(10, 10'000, 60'000);
  REQUIRE(retried.size() == 1);
  CHECK(retried[0].id == b);
  CHECK(retried[0].attempts == 2);
  CHECK(retried[0].last_error == "421 try later");
  CHECK(store->mark_sent(b, 11'000));
  CHECK(store->get(b)->last_error == "421 try later");  // History stays.

  CHECK(store->mark_failed(c, "550 no such user", 4000));
  job = store->get(c);
  CHECK(job->state == JobState::failed);
  CHECK(job->last_error == "550 no such user");
  CHECK(job->finished_ms == 4000);
  CHECK(job->lease_until_ms == 0);

  CHECK(store->release(d, 5000));
  job = store->get(d);
  CHECK(job->state == JobState::queued);
  CHECK(job->attempts == 0);
  CHECK(job->lease_until_ms == 0);
  CHECK(job->updated_ms == 5000);
  CHECK_FALSE(store->release(d, 5000));  // Only a sending job can be released.

  CHECK_FALSE(store->mark_sent("ffffffffffffffffffffffffffffffff", 1));
  CHECK_FALSE(store->release("nope", 1));
}

TEST_CASE_TEMPLATE("stats and count_pending count by state", Backend, SqliteBackend,
                   PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(false);
  auto empty = store->stats(0);
  for (auto count : empty.by_state) CHECK(count == 0);
  CHECK(empty.oldest_queued_ms == 0);
  CHECK(store->count_pending() == 0);

  const Job a = insert_one(*store, new_job("a"), 1000).job;
  store->insert_batch({new_job("b"), new_job("c"), new_job("d")}, 2000);
  insert_one(*store, new_job("e"), 3000);
  const auto claimed = store->claim(4, 3000, 60'000);  // a, b, c, d
  REQUIRE(claimed.size() == 4);
  REQUIRE(claimed[0].id == a.id);
  store->mark_retry(a.id, "later", 99'000, 4000);
  store->mark_sent(claimed[1].id, 4000);
  store->mark_failed(claimed[2].id, "no", 4000);

  const auto stats = store->stats(5000);
  CHECK(stats.by_state[static_cast<std::size_t>(JobState::queued)] == 1);
  CHECK(stats.by_state[static_cast<std::size_t>(JobState::sending)] == 1);
  CHECK(stats.by_state[static_cast<std::size_t>(JobState::retrying)] == 1);
  CHECK(stats.by_state[static_cast<std::size_t>(JobState::sent)] == 1);
  CHECK(stats.by_state[static_cast<std::size_t>(JobState::failed)] == 1);
  CHECK(stats.oldest_queued_ms == 1000);  // a: retrying counts as waiting.
  CHECK(store->count_pending() == 3);
}

TEST_CASE_TEMPLATE("a failing insert stores nothing of its batch", Backend, SqliteBackend,
                   PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  backend.open(false);  // Creates the schema.
  backend.sql(Backend::boom_trigger);
  auto store = backend.open(false);
  const std::string error = error_of([&] {
    store->insert_batch({new_job("a", "k"), NewJob{"boom", "b", ""}}, 1000);
  });
  CHECK(error.find(backend.named_in_errors()) != std::string::npos);
  CHECK(error.find("insert") != std::string::npos);
  CHECK(error.find("boom refused") != std::string::npos);
  CHECK(store->count_pending() == 0);
  // The store is still usable, and the key was not taken.
  CHECK(insert_one(*store, new_job("a", "k"), 2000).created);
}

TEST_CASE_TEMPLATE("transaction() groups calls and rolls all of them back on failure", Backend,
                   SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  backend.open(false);
  backend.sql(Backend::boom_trigger);
  auto store = backend.open(false);
  const auto batch = store->insert_batch({new_job("a"), new_job("b")}, 1000);
  REQUIRE(store->claim(2, 1000, 60'000).size() == 2);

  CHECK_THROWS_AS(store->transaction([&] {
    CHECK(store->mark_sent(batch[0].job.id, 2000));
    throw std::runtime_error("caller gave up");
  }),
                  std::runtime_error);
  CHECK(store->get(batch[0].job.id)->state == JobState::sending);

  // A failure inside that the body swallows still dooms the transaction.
  const std::string error = error_of([&] {
    store->transaction([&] {
      store->mark_sent(batch[0].job.id, 2000);
      CHECK_THROWS(store->insert_batch({NewJob{"boom", "", ""}}, 2000));
    });
  });
  CHECK(error.find("rolled back") != std::string::npos);
  CHECK(store->get(batch[0].job.id)->state == JobState::sending);

  store->transaction([&] {
    store->mark_sent(batch[0].job.id, 3000);
    store->transaction([&] { store->mark_failed(batch[1].job.id, "bad", 3000); });
    store->insert_batch({new_job("c")}, 3000);
  });
  CHECK(store->get(batch[0].job.id)->state == JobState::sent);
  CHECK(store->get(batch[1].job.id)->state == JobState::failed);
  CHECK(store->count_pending() == 1);
}

TEST_CASE_TEMPLATE("closing and reopening the store keeps every job", Backend, SqliteBackend,
                   PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  std::string sent_id, queued_id, keyed_id;
  {
    auto store = backend.open(true);
    sent_id = insert_one(*store, new_job("s"), 1000).job.id;
    REQUIRE(store->claim(1, 1000, 60'000).size() == 1);
    store->mark_sent(sent_id, 2000);
    queued_id = insert_one(*store, new_job("q"), 3000).job.id;
    keyed_id = insert_one(*store, new_job("k", "key"), 3000).job.id;
  }
  auto store = backend.open(true);
  CHECK(store->get(sent_id)->state == JobState::sent);
  CHECK(store->get(sent_id)->finished_ms == 2000);
  CHECK(store->get(queued_id)->payload == "q");
  CHECK(store->count_pending() == 2);
  const Inserted again = insert_one(*store, new_job("other", "key"), 4000);
  CHECK_FALSE(again.created);
  CHECK(again.job.id == keyed_id);
}

TEST_CASE_TEMPLATE("a second store on the same file reads while the StoreWorker writes", Backend,
                   SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  FakeLoop loop;
  StoreWorker worker(backend.open(true), loop.poster());
  auto reader = backend.open(true);
  int stored = 0;
  for (int i = 0; i < 3000; ++i) {
    worker.insert(new_job("x"), [&](std::variant<Inserted, std::string> outcome) {
      if (std::holds_alternative<Inserted>(outcome)) ++stored;
    });
  }
  std::int64_t last_seen = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (stored < 3000) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    const auto stats = reader->stats(0);  // Never SQLITE_BUSY: WAL readers do not wait.
    const std::int64_t queued = stats.by_state[static_cast<std::size_t>(JobState::queued)];
    CHECK(queued >= last_seen);
    last_seen = queued;
    loop.drain();
  }
  CHECK(reader->count_pending() == 3000);
}

TEST_CASE("a job committed by a process survives its kill -9") {
  TempDir dir;
  const std::string path = dir.file("jobs.db");
  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // The child acknowledges only after insert_batch returned, i.e. after the commit, then
    // waits with the connection open: nothing is checkpointed or closed cleanly.
    ::close(pipe_fds[0]);
    try {
      auto store = open_sqlite_store(path, true);
      const Inserted inserted = insert_one(*store, new_job("survivor", "child-key"), 1234);
      const std::string message = "ok " + inserted.job.id;
      if (::write(pipe_fds[1], message.data(), message.size()) !=
          static_cast<ssize_t>(message.size())) {
        ::_exit(2);
      }
      for (;;) ::pause();
    } catch (...) {
      ::_exit(1);
    }
  }
  ::close(pipe_fds[1]);
  char buffer[64] = {};
  std::size_t got = 0;
  while (got < 35) {
    const ssize_t n = ::read(pipe_fds[0], buffer + got, sizeof buffer - 1 - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<std::size_t>(n);
  }
  ::close(pipe_fds[0]);
  ::kill(child, SIGKILL);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGKILL);

  const std::string message(buffer, got);
  REQUIRE(message.size() == 35);
  REQUIRE(message.substr(0, 3) == "ok ");
  const std::string id = message.substr(3);
  // The job is only in the write-ahead log: the reopen recovers it from there.
  CHECK(std::filesystem::file_size(path + "-wal") > 0);

  auto store = open_sqlite_store(path, true);
  const auto job = store->get(id);
  REQUIRE(job.has_value());
  CHECK(job->payload == "survivor");
  CHECK(job->idempotency_key == "child-key");
  CHECK(job->state == JobState::queued);
  CHECK(job->created_ms == 1234);
}

TEST_CASE("a file that is not a SQLite database is refused with its path") {
  TempDir dir;
  const std::string path = dir.file("not-a.db");
  {
    std::ofstream out(path, std::ios::binary);
    for (int i = 0; i < 200; ++i) out << "this is not a database, it is a text file\n";
  }
  const std::string error = error_of([&] { open_sqlite_store(path, true); });
  CHECK(error.find(path) != std::string::npos);
  CHECK(error.find("not a SQLite database") != std::string::npos);
}

TEST_CASE("a missing directory is refused with the path") {
  TempDir dir;
  const std::string path = dir.file("missing/jobs.db");
  const std::string error = error_of([&] { open_sqlite_store(path, true); });
  CHECK(error.find(path) != std::string::npos);
  CHECK(error.find("open") != std::string::npos);
  CHECK(error.find("directory") != std::string::npos);
}

TEST_CASE("a store with a newer schema version is refused untouched") {
  TempDir dir;
  const std::string path = dir.file("jobs.db");
  open_sqlite_store(path, true);
  run_sql(path, "PRAGMA user_version=99");
  const std::string error = error_of([&] { open_sqlite_store(path, true); });
  CHECK(error.find(path) != std::string::npos);
  CHECK(error.find("schema version 99 is newer") != std::string::npos);
}

TEST_CASE_TEMPLATE("StoreWorker group-commits inserts and answers each exactly once on the loop",
                   Backend, SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  FakeLoop loop;
  const auto loop_thread = std::this_thread::get_id();
  StoreWorker worker(backend.open(true), loop.poster());

  constexpr int count = 2000;
  std::vector<int> calls(count, 0);
  std::set<std::string> ids;
  int off_thread = 0;
  for (int i = 0; i < count; ++i) {
    worker.insert(new_job("p" + std::to_string(i)),
                  [&, i](std::variant<Inserted, std::string> outcome) {
                    ++calls[i];
                    if (std::this_thread::get_id() != loop_thread) ++off_thread;
                    REQUIRE(std::holds_alternative<Inserted>(outcome));
                    const Inserted& inserted = std::get<Inserted>(outcome);
                    CHECK(inserted.created);
                    CHECK(inserted.job.payload == "p" + std::to_string(i));
                    ids.insert(inserted.job.id);
                  });
  }
  // run() after the inserts sees all of them committed.
  std::int64_t pending_seen = -1;
  CHECK(worker.run([&, post = loop.poster()](JobStore& store) {
    const std::int64_t pending = store.count_pending();
    post([&pending_seen, pending] { pending_seen = pending; });
  }));
  REQUIRE(loop.drain_until([&] { return pending_seen >= 0 && ids.size() == count; }));
  CHECK(pending_seen == count);
  CHECK(off_thread == 0);
  for (int c : calls) CHECK(c == 1);
  CHECK(worker.inserts_committed() == count);
  CHECK(worker.batches_committed() >= 1);
  CHECK(worker.batches_committed() < count);
  MESSAGE("2000 inserts in " << worker.batches_committed() << " commits");
  worker.stop();
  loop.drain();
  for (int c : calls) CHECK(c == 1);
  CHECK(loop.errors.empty());
}

TEST_CASE_TEMPLATE("StoreWorker runs an operation after the inserts queued before it, in order",
                   Backend, SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  FakeLoop loop;
  StoreWorker worker(backend.open(false), loop.poster());
  std::vector<std::string> order;
  auto post = loop.poster();
  for (int round = 0; round < 50; ++round) {
    worker.insert(new_job("x", "key-" + std::to_string(round)),
                  [&, round](std::variant<Inserted, std::string> outcome) {
                    REQUIRE(std::holds_alternative<Inserted>(outcome));
                    order.push_back("insert " + std::to_string(round));
                  });
    worker.run([&, round, post](JobStore& store) {
      // The insert queued just before is committed and visible (later ones may be too:
      // every waiting insert joins one batch).
      const std::int64_t pending = store.count_pending();
      post([&, round, pending] {
        CHECK(pending >= round + 1);
        order.push_back("run " + std::to_string(round));
      });
    });
  }
  REQUIRE(loop.drain_until([&] { return order.size() == 100; }));
  // Each insert's answer comes before the answer of the operation queued after it, and the
  // operations answer in the order they were queued.
  int last_run = -1;
  for (int round = 0; round < 50; ++round) {
    const auto inserted = std::find(order.begin(), order.end(), "insert " + std::to_string(round));
    const auto ran = std::find(order.begin(), order.end(), "run " + std::to_string(round));
    REQUIRE(inserted != order.end());
    REQUIRE(ran != order.end());
    CHECK(inserted < ran);
    CHECK(ran - order.begin() > last_run);
    last_run = static_cast<int>(ran - order.begin());
  }
}

TEST_CASE_TEMPLATE("StoreWorker::stop drains the queue, then refuses new work", Backend,
                   SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  FakeLoop loop;
  int stored = 0;
  int refused = 0;
  bool ran_after_stop = false;
  {
    StoreWorker worker(backend.open(true), loop.poster());
    for (int i = 0; i < 500; ++i) {
      worker.insert(new_job("x"), [&](std::variant<Inserted, std::string> outcome) {
        if (std::holds_alternative<Inserted>(outcome)) ++stored;
      });
    }
    worker.stop();
    CHECK(worker.queue_depth() == 0);
    CHECK(worker.inserts_committed() == 500);
    worker.stop();  // Idempotent.
    worker.insert(new_job("late"), [&](std::variant<Inserted, std::string> outcome) {
      REQUIRE(std::holds_alternative<std::string>(outcome));
      CHECK(std::get<std::string>(outcome).find("shut down") != std::string::npos);
      ++refused;
    });
    CHECK(refused == 0);  // Never inside insert() itself.
    CHECK_FALSE(worker.run([&](JobStore&) { ran_after_stop = true; }));
  }
  loop.drain();
  CHECK(stored == 500);
  CHECK(refused == 1);
  CHECK_FALSE(ran_after_stop);
  CHECK(backend.open(true)->count_pending() == 500);
}

TEST_CASE_TEMPLATE(
    "StoreWorker fails every insert of a failed batch, and survives operations that throw", Backend,
    SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  backend.open(false);
  backend.sql(Backend::boom_trigger);
  FakeLoop loop;
  StoreWorker worker(backend.open(false), loop.poster());

  // Hold the worker inside an operation so that the three inserts form one batch.
  std::mutex gate;
  std::unique_lock<std::mutex> hold(gate);
  std::atomic<bool> entered{false};
  worker.run([&](JobStore&) {
    entered = true;
    std::lock_guard<std::mutex> wait(gate);
  });
  while (!entered) std::this_thread::yield();
  std::vector<std::string> errors;
  for (const char* kind : {"email", "boom", "email"}) {
    worker.insert(NewJob{kind, "p", ""}, [&](std::variant<Inserted, std::string> outcome) {
      REQUIRE(std::holds_alternative<std::string>(outcome));
      errors.push_back(std::get<std::string>(outcome));
    });
  }
  CHECK(worker.queue_depth() == 3);
  hold.unlock();
  REQUIRE(loop.drain_until([&] { return errors.size() == 3; }));
  for (const std::string& error : errors) {
    CHECK(error.find("boom refused") != std::string::npos);
    CHECK(error.find(backend.named_in_errors()) != std::string::npos);
  }
  CHECK(worker.batches_committed() == 0);

  worker.run([](JobStore&) { throw std::runtime_error("operation broke"); });
  bool ok = false;
  worker.insert(new_job("fine"), [&](std::variant<Inserted, std::string> outcome) {
    ok = std::holds_alternative<Inserted>(outcome);
  });
  // The insert may commit before the operation queued ahead of it runs: wait for both.
  REQUIRE(loop.drain_until([&] { return ok && !loop.errors.empty(); }));
  REQUIRE(loop.errors.size() == 1);
  CHECK(loop.errors[0] == "operation broke");
  CHECK(worker.batches_committed() == 1);

  // stop() from inside an operation would join its own thread: refused, and the worker goes on.
  worker.run([&](JobStore&) { worker.stop(); });
  bool after = false;
  CHECK(worker.run([&, post = loop.poster()](JobStore&) { post([&] { after = true; }); }));
  REQUIRE(loop.drain_until([&] { return after; }));
  REQUIRE(loop.errors.size() == 2);
  CHECK(loop.errors[1].find("own thread") != std::string::npos);
}

namespace {

// Reads one integer through a separate connection (read-only use of the file).
std::int64_t sql_int(const std::string& path, const char* sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, sql, -1, &stmt, nullptr) == SQLITE_OK);
  std::int64_t value = -1;
  if (sqlite3_step(stmt) == SQLITE_ROW) value = sqlite3_column_int64(stmt, 0);
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return value;
}

unsigned file_mode(const std::string& path) {
  struct stat status {};
  REQUIRE(::stat(path.c_str(), &status) == 0);
  return status.st_mode & 0777;
}

// Sets the umask for one scope.
struct Umask {
  explicit Umask(mode_t mask) : old(::umask(mask)) {}
  ~Umask() { ::umask(old); }
  mode_t old;
};

}  // namespace

TEST_CASE("the store's files are created 0600 whatever the umask") {
  TempDir dir;
  const std::string path = dir.file("jobs.db");
  {
    const Umask open_umask(0);
    auto store = open_sqlite_store(path, true);
    insert_one(*store, new_job("private"), 1);
    CHECK(file_mode(path) == 0600);
    CHECK(file_mode(path + "-wal") == 0600);
    CHECK(file_mode(path + "-shm") == 0600);
  }
  // An existing file keeps the mode its owner chose.
  REQUIRE(::chmod(path.c_str(), 0640) == 0);
  open_sqlite_store(path, true);
  CHECK(file_mode(path) == 0640);
}

TEST_CASE("another program's SQLite file is refused before anything is written to it") {
  TempDir dir;
  const std::string path = dir.file("other.db");
  run_sql(path, "CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('ann')");
  const std::string before = squall::testing::read_file(path);
  const std::string error = error_of([&] { open_sqlite_store(path, true); });
  CHECK(error.find(path) != std::string::npos);
  CHECK(error.find("another program") != std::string::npos);
  CHECK(error.find("users") != std::string::npos);
  // Byte for byte as it was: still in rollback-journal mode, no schema, no application id.
  CHECK(squall::testing::read_file(path) == before);
  CHECK(!std::filesystem::exists(path + "-wal"));

  // The same with another program's application id and no tables at all.
  const std::string tagged = dir.file("tagged.db");
  run_sql(tagged, "PRAGMA application_id=1234");
  const std::string tagged_before = squall::testing::read_file(tagged);
  const std::string tagged_error = error_of([&] { open_sqlite_store(tagged, true); });
  CHECK(tagged_error.find("application_id 0x000004d2") != std::string::npos);
  CHECK(squall::testing::read_file(tagged) == tagged_before);
}

TEST_CASE("a store of schema version 1 is migrated in place and keeps its jobs") {
  TempDir dir;
  const std::string path = dir.file("jobs.db");
  // The file as the first squall left it: version 1, no application id, no auto_vacuum.
  run_sql(path,
          "PRAGMA journal_mode=WAL;"
          "CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, kind TEXT NOT "
          "NULL, state TEXT NOT NULL CHECK (state IN ('queued', 'sending', 'retrying', 'sent', "
          "'failed')), payload BLOB NOT NULL, idempotency_key TEXT NOT NULL DEFAULT '', attempts "
          "INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '', created_ms INTEGER "
          "NOT NULL, updated_ms INTEGER NOT NULL, run_after_ms INTEGER NOT NULL, lease_until_ms "
          "INTEGER NOT NULL DEFAULT 0, finished_ms INTEGER NOT NULL DEFAULT 0);"
          "CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key) WHERE "
          "idempotency_key <> '';"
          "CREATE INDEX jobs_due ON jobs (state, run_after_ms, created_ms);"
          "INSERT INTO jobs (id, kind, state, payload, idempotency_key, created_ms, updated_ms, "
          "run_after_ms) VALUES ('0123456789abcdef0123456789abcdef', 'email', 'queued', "
          "'old payload', 'old-key', 5, 5, 5);"
          "PRAGMA user_version=1;");
  REQUIRE(sql_int(path, "PRAGMA auto_vacuum") == 0);
  {
    auto store = open_sqlite_store(path, true);
    const auto job = store->get("0123456789abcdef0123456789abcdef");
    REQUIRE(job.has_value());
    CHECK(job->payload == "old payload");
    CHECK(job->payload_digest == squall::jobs::payload_digest("old payload"));
    // The old key still finds the old job, and the digest compares the same request.
    const Inserted repeat = insert_one(*store, new_job("old payload", "old-key"), 9);
    CHECK(!repeat.created);
    CHECK(repeat.job.id == "0123456789abcdef0123456789abcdef");
  }
  CHECK(sql_int(path, "PRAGMA user_version") == squall::jobs::sqlite_schema_version);
  CHECK(sql_int(path, "PRAGMA application_id") == squall::jobs::sqlite_application_id);
  CHECK(sql_int(path, "PRAGMA auto_vacuum") == 2);
  // A second open migrates nothing more and refuses nothing.
  CHECK(error_of([&] { open_sqlite_store(path, true); }).empty());
}

TEST_CASE("a new store is incremental-vacuum, tagged and at the current version") {
  TempDir dir;
  const std::string path = dir.file("jobs.db");
  open_sqlite_store(path, true);
  CHECK(sql_int(path, "PRAGMA auto_vacuum") == 2);
  CHECK(sql_int(path, "PRAGMA application_id") == squall::jobs::sqlite_application_id);
  CHECK(sql_int(path, "PRAGMA user_version") == squall::jobs::sqlite_schema_version);
}

TEST_CASE_TEMPLATE("only a job with an Idempotency-Key is stored with a payload digest", Backend,
                   SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(true);
  const Inserted keyed = insert_one(*store, new_job("keyed payload", "k"), 1);
  const Inserted keyless = insert_one(*store, new_job("keyless payload", ""), 2);
  CHECK(keyed.job.payload_digest == squall::jobs::payload_digest("keyed payload"));
  CHECK(keyless.job.payload_digest.empty());
  CHECK(store->get(keyed.job.id)->payload_digest == keyed.job.payload_digest);
  CHECK(store->get(keyless.job.id)->payload_digest.empty());
  CHECK(store->get(keyless.job.id)->payload == "keyless payload");
}

TEST_CASE_TEMPLATE("mark_sent deletes the payload and keeps its digest", Backend, SqliteBackend,
                   PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(true);
  const Inserted inserted = insert_one(*store, new_job("{\"bcc\":\"secret@example.com\"}", "k"), 1);
  CHECK(inserted.job.payload_digest.size() == 32);
  store->claim(1, 2, 1000);
  REQUIRE(store->mark_sent(inserted.job.id, 3));
  const auto job = store->get(inserted.job.id);
  REQUIRE(job.has_value());
  CHECK(job->payload.empty());
  CHECK(job->payload_digest == squall::jobs::payload_digest("{\"bcc\":\"secret@example.com\"}"));
  // A failed job keeps its payload (an operator may want to send it again).
  const Inserted other = insert_one(*store, new_job("kept"), 4);
  store->claim(1, 5, 1000);
  REQUIRE(store->mark_failed(other.job.id, "550", 6));
  CHECK(store->get(other.job.id)->payload == "kept");
}

TEST_CASE_TEMPLATE(
    "purge_finished deletes old finished jobs in batches, and compact shrinks the file", Backend,
    SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(false);
  const std::string big(20'000, 'x');
  std::vector<NewJob> batch;
  for (int i = 0; i < 60; ++i)
    batch.push_back(new_job(big + std::to_string(i), "key-" + std::to_string(i)));
  const auto inserted = store->insert_batch(batch, 10);
  const auto pending = insert_one(*store, new_job("still queued", "pending-key"), 10);
  const auto claimed = store->claim(60, 11, 1000);
  REQUIRE(claimed.size() == 60);
  for (int i = 0; i < 60; ++i) {
    // Finished at 100 + i: half before the cutoff of 130, half after.
    if (i % 2 == 0) {
      REQUIRE(store->mark_sent(inserted[i].job.id, 100 + i));
    } else {
      REQUIRE(store->mark_failed(inserted[i].job.id, "no", 100 + i));
    }
  }
  std::int64_t pages_before = 0;
  if constexpr (std::is_same_v<Backend, SqliteBackend>) {
    pages_before = sql_int(backend.location, "PRAGMA page_count");
  }
  CHECK(store->purge_finished(130, 20) == 20);
  CHECK(store->purge_finished(130, 20) == 10);
  CHECK(store->purge_finished(130, 20) == 0);
  for (int i = 0; i < 60; ++i) {
    CHECK(store->get(inserted[i].job.id).has_value() == (100 + i >= 130));
  }
  CHECK(store->get(pending.job.id).has_value());
  // A purged key is free again: the same key makes a new job.
  CHECK(insert_one(*store, new_job("again", "key-0"), 200).created);
  CHECK(!insert_one(*store, new_job("again", "key-59"), 200).created);

  CHECK(store->purge_finished(1'000, 100) == 30);
  if constexpr (std::is_same_v<Backend, SqliteBackend>) {
    CHECK(store->compact(10) > 0);  // Bounded: pages are left for the next round.
    CHECK(store->compact(1'000'000) == 0);
    store->transaction([] {});  // Checkpoint-free: the page count is what the WAL says.
    CHECK(sql_int(backend.location, "PRAGMA page_count") < pages_before / 4);
  } else {
    CHECK(store->compact(10) == 0);  // The server's autovacuum reuses the space.
  }
}

TEST_CASE_TEMPLATE("expire_all_leases makes sending jobs claimable at once; StoreLock is exclusive",
                   Backend, SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(true);
  const Inserted sending = insert_one(*store, new_job("a"), 1);
  insert_one(*store, new_job("b"), 1);
  REQUIRE(store->claim(1, 2, 1'000'000).size() == 1);
  CHECK(store->claim(5, 3, 1'000'000).size() == 1);  // Only "b": "a" is leased.
  CHECK(store->expire_all_leases(4) == 2);
  const auto again = store->claim(5, 5, 1'000'000);
  REQUIRE(again.size() == 2);
  CHECK(again[0].id == sending.job.id);
  CHECK(again[0].attempts == 2);

  if constexpr (!std::is_same_v<Backend, SqliteBackend>) return;
  const std::string& path = backend.location;
  std::string holder;
  auto first = squall::jobs::StoreLock::try_acquire(path, holder);
  CHECK(first.acquired());
  CHECK(holder.empty());
  auto second = squall::jobs::StoreLock::try_acquire(path, holder);
  CHECK(!second.acquired());
  CHECK(holder == std::to_string(::getpid()));
  CHECK(file_mode(path + ".lock") == 0600);
  first = squall::jobs::StoreLock::try_acquire(path + ".other", holder);  // Releases the first.
  CHECK(squall::jobs::StoreLock::try_acquire(path, holder).acquired());
}

TEST_CASE("probe_write fails while another connection holds the write lock, then succeeds") {
  TempDir dir;
  const std::string path = dir.file("jobs.db");
  auto store = open_sqlite_store(path, true);
  store->probe_write(1);
  sqlite3* other = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &other) == SQLITE_OK);
  REQUIRE(sqlite3_exec(other, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_busy_timeout(other, 0);
  // The store waits its busy timeout (5 s) and then reports the lock.
  const auto started = std::chrono::steady_clock::now();
  const std::string error = error_of([&] { store->probe_write(2); });
  CHECK(std::chrono::steady_clock::now() - started >= std::chrono::seconds(4));
  CHECK(error.find("probe_write") != std::string::npos);
  CHECK(error.find("locked") != std::string::npos);
  REQUIRE(sqlite3_exec(other, "COMMIT", nullptr, nullptr, nullptr) == SQLITE_OK);
  sqlite3_close(other);
  store->probe_write(3);
}

// ---- Owners (schema 3) -----------------------------------------------------------------------

namespace {

// The schema 1 table and index exactly as squall created them before owners existed.
constexpr const char* schema_1_sql = R"sql(
CREATE TABLE jobs (
  seq INTEGER PRIMARY KEY,
  id TEXT NOT NULL UNIQUE,
  kind TEXT NOT NULL,
  state TEXT NOT NULL CHECK (state IN ('queued', 'sending', 'retrying', 'sent', 'failed')),
  payload BLOB NOT NULL,
  idempotency_key TEXT NOT NULL DEFAULT '',
  attempts INTEGER NOT NULL DEFAULT 0,
  last_error TEXT NOT NULL DEFAULT '',
  created_ms INTEGER NOT NULL,
  updated_ms INTEGER NOT NULL,
  run_after_ms INTEGER NOT NULL,
  lease_until_ms INTEGER NOT NULL DEFAULT 0,
  finished_ms INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key) WHERE idempotency_key <> '';
CREATE INDEX jobs_due ON jobs (state, run_after_ms, created_ms);
INSERT INTO jobs (id, kind, state, payload, idempotency_key, created_ms, updated_ms, run_after_ms)
  VALUES ('0123456789abcdef0123456789abcdef', 'email', 'queued', 'old', 'k1', 5, 5, 5);
PRAGMA user_version=1;
)sql";

int user_version(const std::string& path) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &stmt, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(stmt) == SQLITE_ROW);
  const int version = sqlite3_column_int(stmt, 0);
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return version;
}

NewJob owned_job(std::string payload, std::string key, std::string owner) {
  return NewJob{"email", std::move(payload), std::move(key), std::move(owner)};
}

}  // namespace

TEST_CASE("a schema 1 store is migrated to owners, keeping its jobs and keys") {
  TempDir dir;
  const std::string path = dir.file("jobs.db");
  run_sql(path, schema_1_sql);
  REQUIRE(user_version(path) == 1);

  auto store = open_sqlite_store(path, false);
  CHECK(user_version(path) == squall::jobs::sqlite_schema_version);
  const auto old = store->get("0123456789abcdef0123456789abcdef");
  REQUIRE(old);
  CHECK(old->payload == "old");
  CHECK(old->owner.empty());
  // The old key still belongs to the anonymous owner ...
  const Inserted again = insert_one(*store, owned_job("other", "k1", ""), 10);
  CHECK_FALSE(again.created);
  CHECK(again.job.id == old->id);
  // ... and no longer collides with a token's key of the same text.
  const Inserted token_job = insert_one(*store, owned_job("mine", "k1", "alice"), 10);
  CHECK(token_job.created);
  CHECK(token_job.job.owner == "alice");
  store.reset();
  // Opening again does not migrate twice.
  auto reopened = open_sqlite_store(path, false);
  CHECK(reopened->get(token_job.job.id)->owner == "alice");
}

TEST_CASE_TEMPLATE("idempotency keys are scoped per owner", Backend, SqliteBackend,
                   PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(false);
  const Inserted alice = insert_one(*store, owned_job("a", "order-1", "alice"), 1);
  const Inserted bob = insert_one(*store, owned_job("b", "order-1", "bob"), 2);
  CHECK(alice.created);
  CHECK(bob.created);
  CHECK(alice.job.id != bob.job.id);
  const Inserted alice_again = insert_one(*store, owned_job("a2", "order-1", "alice"), 3);
  CHECK_FALSE(alice_again.created);
  CHECK(alice_again.job.id == alice.job.id);
  CHECK(alice_again.job.payload == "a");
  // Within one batch too.
  const auto batch = store->insert_batch(
      {owned_job("x", "k", "carol"), owned_job("y", "k", "dave"), owned_job("z", "k", "carol")}, 4);
  CHECK(batch[0].created);
  CHECK(batch[1].created);
  CHECK_FALSE(batch[2].created);
  CHECK(batch[2].job.id == batch[0].job.id);
  CHECK(store->get(bob.job.id)->owner == "bob");
}

TEST_CASE_TEMPLATE("pending_by_owner counts waiting jobs and payload bytes per owner", Backend,
                   SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(false);
  store->insert_batch({owned_job("12345", "", "alice"), owned_job("123", "", "alice"),
                       owned_job("1", "", ""), owned_job("done", "", "bob")},
                      1);
  const auto claimed = store->claim(10, 2, 1000);
  for (const Job& job : claimed) {
    if (job.owner == "bob") store->mark_sent(job.id, 3);
  }
  auto usage = store->pending_by_owner();
  std::sort(usage.begin(), usage.end(),
            [](const auto& a, const auto& b) { return a.owner < b.owner; });
  REQUIRE(usage.size() == 2);
  CHECK(usage[0].owner.empty());
  CHECK(usage[0].jobs == 1);
  CHECK(usage[0].bytes == 1);
  CHECK(usage[1].owner == "alice");
  CHECK(usage[1].jobs == 2);
  CHECK(usage[1].bytes == 8);
}

TEST_CASE("schema 4: a version 3 store gains webhook columns, its jobs owe none") {
  TempDir dir;
  const std::string path = dir.file("jobs.db");
  std::string id;
  {
    auto store = open_sqlite_store(path, true);
    id = insert_one(*store, new_job("old", "k"), 1).job.id;
    store->claim(1, 2, 1000);
    REQUIRE(store->mark_sent(id, 3));
  }
  // Back to the version 3 layout, as squall wrote it before webhooks.
  run_sql(path,
          "DROP INDEX jobs_webhooks_due;"
          "ALTER TABLE jobs DROP COLUMN webhook_state;"
          "ALTER TABLE jobs DROP COLUMN webhook_attempts;"
          "ALTER TABLE jobs DROP COLUMN webhook_due_ms;"
          "PRAGMA user_version=3;");
  {
    auto store = open_sqlite_store(path, true);
    const auto job = store->get(id);
    REQUIRE(job.has_value());
    CHECK(job->state == JobState::sent);
    CHECK(job->webhook == squall::jobs::WebhookState::none);
    CHECK(store->claim_webhooks(10, 100, 1000).empty());
    CHECK(store->count_webhooks_owed() == 0);
  }
  CHECK(sql_int(path, "PRAGMA user_version") == squall::jobs::sqlite_schema_version);
}

// The table's CREATE statement as sqlite_schema holds it.
std::string jobs_table_sql(const std::string& path) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, "SELECT sql FROM sqlite_schema WHERE name = 'jobs'", -1, &stmt,
                             nullptr) == SQLITE_OK);
  std::string sql;
  if (sqlite3_step(stmt) == SQLITE_ROW) {
    sql = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return sql;
}

TEST_CASE("schema 5: a version 4 store's state CHECK becomes comparisons, still enforced") {
  TempDir dir;
  const std::string path = dir.file("jobs.db");
  const std::string v1_check =
      "CHECK (state IN ('queued', 'sending', 'retrying', 'sent', 'failed'))";
  std::string id;
  {
    auto store = open_sqlite_store(path, true);
    id = insert_one(*store, new_job("old", "k"), 1).job.id;
  }
  const std::string v5_check =
      "CHECK (state = 'queued' OR state = 'sending' OR state = 'retrying' OR state = 'sent' OR "
      "state = 'failed')";
  REQUIRE(jobs_table_sql(path).find(v5_check) != std::string::npos);
  // Back to the version 4 text, as every squall before wrote it.
  const auto quoted = [](std::string text) {
    for (std::size_t at = text.find('\''); at != std::string::npos; at = text.find('\'', at + 2)) {
      text.insert(at, 1, '\'');
    }
    return "'" + text + "'";
  };
  run_sql(path, ("PRAGMA writable_schema=ON; UPDATE sqlite_schema SET sql = replace(sql, " +
                 quoted(v5_check) + ", " + quoted(v1_check) +
                 ") WHERE name = 'jobs'; PRAGMA writable_schema=OFF; PRAGMA user_version=4;")
                    .c_str());
  REQUIRE(jobs_table_sql(path).find(v1_check) != std::string::npos);
  {
    auto store = open_sqlite_store(path, true);
    const auto job = store->get(id);
    REQUIRE(job.has_value());
    CHECK(job->state == JobState::queued);
    CHECK(store->claim(5, 2, 1000).size() == 1);
    CHECK(store->mark_sent(id, 3));
  }
  CHECK(sql_int(path, "PRAGMA user_version") == squall::jobs::sqlite_schema_version);
  CHECK(jobs_table_sql(path).find(v1_check) == std::string::npos);
  CHECK(jobs_table_sql(path).find(v5_check) != std::string::npos);
  CHECK(sql_int(path, "SELECT count(*) FROM pragma_integrity_check WHERE integrity_check = 'ok'") ==
        1);
  // The constraint still refuses a state squall does not know, for any writer of the file.
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  const int status = sqlite3_exec(db, "UPDATE jobs SET state = 'lost'", nullptr, nullptr, nullptr);
  const std::string message = sqlite3_errmsg(db);
  sqlite3_close(db);
  CHECK(status == SQLITE_CONSTRAINT);
  CHECK(message.find("CHECK constraint failed") != std::string::npos);
}

TEST_CASE_TEMPLATE(
    "webhooks: owed when a job finishes while on, claimed with a lease, then settled", Backend,
    SqliteBackend, PostgresBackend) {
  using squall::jobs::WebhookState;
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(true);
  const std::string quiet = insert_one(*store, new_job("a", "k0"), 1).job.id;
  store->claim(1, 2, 1000);
  REQUIRE(store->mark_sent(quiet, 3));  // Webhooks off: nothing owed.
  CHECK(store->get(quiet)->webhook == WebhookState::none);

  store->set_webhooks(true);
  const std::string sent = insert_one(*store, new_job("b", "k1"), 10).job.id;
  const std::string failed = insert_one(*store, new_job("c", "k2"), 11).job.id;
  REQUIRE(store->claim(2, 12, 1000).size() == 2);
  REQUIRE(store->mark_sent(sent, 20));
  REQUIRE(store->mark_failed(failed, "refused", 21));
  CHECK(store->count_webhooks_owed() == 2);

  // Claimed oldest due first; a claim leases them (not claimable again until it ends).
  auto claimed = store->claim_webhooks(10, 30, 500);
  REQUIRE(claimed.size() == 2);
  CHECK(claimed[0].id == sent);
  CHECK(claimed[0].state == JobState::sent);
  CHECK(claimed[0].webhook == WebhookState::owed);
  CHECK(claimed[0].webhook_attempts == 1);
  CHECK(claimed[1].id == failed);
  CHECK(claimed[1].state == JobState::failed);
  CHECK(store->claim_webhooks(10, 529, 500).empty());
  // max is honoured; after the lease the next claim counts another attempt.
  claimed = store->claim_webhooks(1, 530, 500);
  REQUIRE(claimed.size() == 1);
  CHECK(claimed[0].webhook_attempts == 2);

  // A retry is due later; delivered and given up are settled for good.
  REQUIRE(store->mark_webhook(sent, WebhookState::owed, 5'000, 531));
  REQUIRE(store->mark_webhook(failed, WebhookState::given_up, 0, 531));
  CHECK(!store->mark_webhook(failed, WebhookState::delivered, 0, 532));  // No longer owed.
  CHECK(store->claim_webhooks(10, 4'999, 500).empty());
  claimed = store->claim_webhooks(10, 5'000, 500);
  REQUIRE(claimed.size() == 1);
  CHECK(claimed[0].id == sent);
  REQUIRE(store->mark_webhook(sent, WebhookState::delivered, 0, 5'001));
  CHECK(store->get(sent)->webhook == WebhookState::delivered);
  CHECK(store->get(failed)->webhook == WebhookState::given_up);
  CHECK(store->count_webhooks_owed() == 0);
  CHECK(store->claim_webhooks(10, 1'000'000, 500).empty());
  CHECK(!store->release_webhook(sent, 5'002));  // Delivered: nothing to release.
}

TEST_CASE_TEMPLATE("webhooks: a released claim is due at once and its attempt does not count",
                   Backend, SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(true);
  store->set_webhooks(true);
  const std::string id = insert_one(*store, new_job("a", "k"), 1).job.id;
  REQUIRE(store->claim(1, 2, 1000).size() == 1);
  REQUIRE(store->mark_sent(id, 3));
  REQUIRE(store->claim_webhooks(1, 4, 10'000).size() == 1);
  CHECK(store->claim_webhooks(1, 5, 10'000).empty());  // Leased.
  REQUIRE(store->release_webhook(id, 6));
  const auto again = store->claim_webhooks(1, 6, 10'000);
  REQUIRE(again.size() == 1);
  CHECK(again[0].webhook_attempts == 1);
}

TEST_CASE_TEMPLATE("webhooks: the purge keeps a finished job whose webhook is still owed", Backend,
                   SqliteBackend, PostgresBackend) {
  using squall::jobs::WebhookState;
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(true);
  store->set_webhooks(true);
  const std::string owed = insert_one(*store, new_job("a", "k1"), 1).job.id;
  const std::string done = insert_one(*store, new_job("b", "k2"), 1).job.id;
  REQUIRE(store->claim(2, 2, 1000).size() == 2);
  REQUIRE(store->mark_sent(owed, 3));
  REQUIRE(store->mark_sent(done, 3));
  REQUIRE(store->claim_webhooks(10, 4, 1000).size() == 2);
  REQUIRE(store->mark_webhook(done, WebhookState::delivered, 0, 5));
  CHECK(store->purge_finished(1'000, 100) == 1);
  CHECK(store->get(owed).has_value());
  CHECK(!store->get(done).has_value());
  REQUIRE(store->mark_webhook(owed, WebhookState::given_up, 0, 6));
  CHECK(store->purge_finished(1'000, 100) == 1);
  CHECK(!store->get(owed).has_value());
}

TEST_CASE_TEMPLATE("hold claims ahead without starting: held jobs stay queued, claims skip them",
                   Backend, SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(false);
  const auto batch =
      store->insert_batch({new_job("a"), new_job("b"), new_job("c"), new_job("d")}, 1000);
  const std::string a = batch[0].job.id, b = batch[1].job.id, c = batch[2].job.id,
                    d = batch[3].job.id;

  // One call takes three, in claim order, and leaves them waiting as they were.
  const auto held = store->hold(3, 2000, 60'000);
  REQUIRE(held.size() == 3);
  CHECK(held[0].id == a);
  CHECK(held[1].id == b);
  CHECK(held[2].id == c);
  for (const Job& job : held) {
    CHECK(job.state == JobState::queued);
    CHECK(job.attempts == 0);
    CHECK(job.lease_until_ms == 62'000);
  }
  CHECK(store->get(a)->state == JobState::queued);
  CHECK(store->get(a)->attempts == 0);
  // Neither a claim nor another hold takes a held job while its hold lasts.
  const auto claimed = store->claim(10, 3000, 60'000);
  REQUIRE(claimed.size() == 1);
  CHECK(claimed[0].id == d);
  CHECK(store->hold(10, 3000, 60'000).empty());

  // Its attempt begins: sending, counted, a lease of its own.
  CHECK(store->start(a, 4000, 60'000));
  auto job = store->get(a);
  CHECK(job->state == JobState::sending);
  CHECK(job->attempts == 1);
  CHECK(job->lease_until_ms == 64'000);
  CHECK_FALSE(store->start(a, 4500, 60'000));  // Already sending.
  CHECK_FALSE(store->start("ffffffffffffffffffffffffffffffff", 4500, 60'000));

  // A released hold is claimable at once, and nothing else changed.
  CHECK(store->release(b, 5000));
  job = store->get(b);
  CHECK(job->state == JobState::queued);
  CHECK(job->attempts == 0);
  CHECK(job->lease_until_ms == 0);
  CHECK_FALSE(store->release(b, 5000));  // Neither sending nor held any more.
  const auto again = store->claim(1, 6000, 60'000);
  REQUIRE(again.size() == 1);
  CHECK(again[0].id == b);

  // A hold that ran out is claimable again, like a lease.
  const auto after_hold = store->claim(10, 62'001, 60'000);
  REQUIRE(after_hold.size() == 1);
  CHECK(after_hold[0].id == c);
  CHECK(after_hold[0].attempts == 1);

  // A sending job whose lease expired is held as retrying: its attempt is over, it waits.
  const auto expired = store->hold(10, 64'001, 60'000);
  REQUIRE(expired.size() == 2);
  CHECK(expired[0].id == a);  // Lease 64'000.
  CHECK(expired[1].id == d);  // Lease 63'000.
  CHECK(store->get(a)->state == JobState::retrying);
  CHECK(store->get(a)->attempts == 1);
  CHECK(store->start(a, 65'000, 60'000));
  CHECK(store->get(a)->attempts == 2);

  // A process that takes the store over ends every hold as well as every lease.
  CHECK(store->get(d)->lease_until_ms == 124'001);
  CHECK(store->expire_all_leases(66'000) == 3);  // a, b, c are sending; d is only held.
  CHECK(store->get(d)->state == JobState::retrying);
  CHECK(store->get(d)->lease_until_ms == 0);
  CHECK(store->claim(10, 66'001, 60'000).size() == 4);
}

TEST_CASE_TEMPLATE("a runner's round: starts, outcomes and a hold commit together or not at all",
                   Backend, SqliteBackend, PostgresBackend) {
  Backend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(true);
  store->set_webhooks(true);
  const auto batch = store->insert_batch(
      {new_job("a"), new_job("b"), new_job("c"), new_job("d"), new_job("e")}, 1000);
  const std::string a = batch[0].job.id, b = batch[1].job.id, c = batch[2].job.id;
  REQUIRE(store->hold(3, 2000, 60'000).size() == 3);

  // A failure anywhere in the round undoes all of it, the hold included.
  CHECK_FALSE(error_of([&] {
                store->transaction([&] {
                  CHECK(store->start(a, 3000, 60'000));
                  CHECK(store->mark_sent(a, 3001));
                  CHECK(store->hold(2, 3001, 60'000).size() == 2);
                  throw std::runtime_error("commit failed");
                });
              }).empty());
  CHECK(store->get(a)->state == JobState::queued);
  CHECK(store->get(a)->webhook == squall::jobs::WebhookState::none);
  CHECK(store->hold(10, 3002, 60'000).size() == 2);       // d and e were not held.
  REQUIRE(store->claim(10, 63'003, 60'000).size() == 5);  // Every hold ran out.
  for (const auto& id : {a, b, c}) REQUIRE(store->release(id, 63'004));
  REQUIRE(store->hold(3, 63'005, 60'000).size() == 3);

  // Committed: each outcome with its webhook owed, in one transaction.
  store->transaction([&] {
    CHECK(store->start(a, 64'000, 60'000));
    CHECK(store->start(b, 64'000, 60'000));
    CHECK(store->start(c, 64'000, 60'000));
    CHECK(store->mark_sent(a, 64'001));
    CHECK(store->mark_retry(b, "421 later", 70'000, 64'001));
    CHECK(store->mark_failed(c, "550 no", 64'001));
  });
  auto job = store->get(a);
  CHECK(job->state == JobState::sent);
  CHECK(job->attempts == 1);
  CHECK(job->webhook == squall::jobs::WebhookState::owed);
  CHECK(store->get(b)->state == JobState::retrying);
  CHECK(store->get(b)->webhook == squall::jobs::WebhookState::none);
  CHECK(store->get(c)->state == JobState::failed);
  CHECK(store->get(c)->webhook == squall::jobs::WebhookState::owed);
}

// ---- WAL checkpoints off the commit path ------------------------------------------------------

namespace {

using squall::jobs::CheckpointStats;
using squall::jobs::sqlite_wal_bound_pages;
using squall::jobs::sqlite_wal_checkpoint_pages;
using squall::jobs::sqlite_wal_tail_pages;

// One commit of `count` jobs of `payload_bytes` each (about that many bytes of WAL pages);
// their ids go to `ids`.
void commit_jobs(JobStore& store, std::size_t count, std::size_t payload_bytes,
                 std::vector<std::string>& ids) {
  std::vector<NewJob> jobs;
  for (std::size_t i = 0; i < count; ++i) {
    jobs.push_back(new_job(std::string(payload_bytes, static_cast<char>('a' + ids.size() % 26))));
  }
  for (auto& inserted : store.insert_batch(jobs, squall::jobs::unix_now_ms())) {
    ids.push_back(inserted.job.id);
  }
}

std::uintmax_t file_size_or_zero(const std::string& path) {
  std::error_code error;
  const auto size = std::filesystem::file_size(path, error);
  return error ? 0 : size;
}

// A WAL file of `pages` frames of 4 KiB (each with its 24-byte header) and its 32-byte header.
constexpr std::uintmax_t wal_file_bytes(int pages) {
  return 32 + static_cast<std::uintmax_t>(pages) * (4096 + 24);
}

// Every job of `ids` is in the store at `path`, opened again, and the file is sound.
void check_all_stored(const std::string& path, const std::vector<std::string>& ids) {
  auto store = open_sqlite_store(path, true);
  CHECK(store->count_pending() == static_cast<std::int64_t>(ids.size()));
  for (const std::string& id : {ids.front(), ids[ids.size() / 2], ids.back()}) {
    CHECK(store->get(id).has_value());
  }
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open(path.c_str(), &db) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &stmt, nullptr) == SQLITE_OK);
  REQUIRE(sqlite3_step(stmt) == SQLITE_ROW);
  CHECK(std::string(reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0))) == "ok");
  sqlite3_finalize(stmt);
  sqlite3_close(db);
}

}  // namespace

namespace {

// The threads of this process, as /proc/self/task lists them.
std::size_t threads_of_this_process() {
  std::size_t threads = 0;
  for ([[maybe_unused]] const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    ++threads;
  }
  return threads;
}

// How many threads of this process carry `name` (/proc/self/task/*/comm).
std::size_t threads_named(std::string_view name) {
  return squall::testing::thread_ids_named(name).size();
}

}  // namespace

TEST_CASE("a steady stream of commits: the checkpoint thread copies the WAL, commits copy a tail") {
  TempDir dir;
  const std::string path = dir.file("jobs.db");
  const std::string wal = path + "-wal";
  std::vector<std::string> ids;
  std::uintmax_t largest_wal = 0;
  CheckpointStats stats;
  {
    const std::size_t threads_before = threads_of_this_process();
    auto store = open_sqlite_store(path, true);  // An fsync per commit, as squalld runs it.
    // No thread until a pass is wanted: a process may fork after opening its store (the
    // kill -9 test's child does; ThreadSanitizer refuses threads after such a fork).
    commit_jobs(*store, 8, 4000, ids);
    CHECK(threads_of_this_process() == threads_before);
    // Commits back to back, each of about 10 pages, until the WAL has started over 3 times.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (store->checkpoint_stats().wal_restarts < 3 &&
           std::chrono::steady_clock::now() < deadline) {
      commit_jobs(*store, 8, 4000, ids);
      largest_wal = std::max(largest_wal, file_size_or_zero(wal));
    }
    stats = store->checkpoint_stats();
    CHECK(threads_of_this_process() == threads_before + 1);
    const auto checkpoint_thread = squall::testing::thread_ids_named("squall-wal");
    REQUIRE(checkpoint_thread.size() == 1);  // What top -H shows for it.
    // Its passes wait for a loop sharing its CPU (lib/core/background_thread.hpp).
    CHECK(::sched_getscheduler(checkpoint_thread.front()) == SCHED_BATCH);
  }
  CHECK(threads_named("squall-wal") == 0);
  MESSAGE((ids.size() / 8) << " commits; checkpoint thread: " << stats.checkpoints << " passes, "
                           << stats.pages << " pages; commits: " << stats.commit_checkpoints
                           << " checkpoints, " << stats.commit_pages << " pages; "
                           << stats.wal_restarts << " restarts; largest WAL " << largest_wal);
  // The WAL is reused: it started over (which a read transaction left open on the checkpoint
  // connection would prevent), and never grew near the bound.
  CHECK(stats.wal_restarts >= 3);
  CHECK(largest_wal <= wal_file_bytes(2 * sqlite_wal_checkpoint_pages));
  // The checkpoint thread copied the WAL; the commits never checkpointed more than a tail.
  CHECK(stats.checkpoints >= 3);
  CHECK(stats.pages >= 3 * static_cast<std::uint64_t>(sqlite_wal_checkpoint_pages) / 2);
  CHECK(stats.commit_checkpoints_over_bound == 0);
  CHECK(stats.commit_pages <= stats.commit_checkpoints * (sqlite_wal_tail_pages + 20));
  CHECK(stats.commit_pages * 4 < stats.pages);
  CHECK(stats.failures == 0);
  // The writer's close checkpointed everything and deleted the WAL.
  CHECK(!std::filesystem::exists(wal));
  check_all_stored(path, ids);
}

TEST_CASE("the store's thread is named squall-store while the StoreWorker runs") {
  TempDir dir;
  const std::size_t before = threads_named("squall-store");
  {
    FakeLoop loop;
    StoreWorker worker(open_sqlite_store(dir.file("jobs.db"), false), loop.poster());
    // The thread names itself first thing: once an operation has run on it, the name is set.
    std::promise<void> ran;
    REQUIRE(worker.run([&](JobStore&) { ran.set_value(); }));
    REQUIRE(ran.get_future().wait_for(std::chrono::seconds(10)) == std::future_status::ready);
    CHECK(threads_named("squall-store") == before + 1);
  }
  CHECK(threads_named("squall-store") == before);
}

TEST_CASE("the store's thread runs under SCHED_BATCH: its wake-ups do not preempt the loop") {
  TempDir dir;
  FakeLoop loop;
  StoreWorker worker(open_sqlite_store(dir.file("jobs.db"), false), loop.poster());
  // The thread sets its policy before it takes any work: it has once an operation has run.
  std::promise<pid_t> ran;
  REQUIRE(worker.run([&](JobStore&) { ran.set_value(static_cast<pid_t>(::gettid())); }));
  auto thread_id = ran.get_future();
  REQUIRE(thread_id.wait_for(std::chrono::seconds(10)) == std::future_status::ready);
  CHECK(::sched_getscheduler(thread_id.get()) == SCHED_BATCH);
  // The loop's own thread keeps the default policy.
  CHECK(::sched_getscheduler(0) == SCHED_OTHER);
}

TEST_CASE("a reader holding an old snapshot: commits past the WAL's bound checkpoint themselves") {
  TempDir dir;
  const std::string path = dir.file("jobs.db");
  std::vector<std::string> ids;
  {
    auto store = open_sqlite_store(path, false);
    commit_jobs(*store, 8, 4000, ids);
    // Another connection's read transaction: no checkpoint may copy a page written after it.
    sqlite3* reader = nullptr;
    REQUIRE(sqlite3_open(path.c_str(), &reader) == SQLITE_OK);
    REQUIRE(sqlite3_exec(reader, "BEGIN; SELECT count(*) FROM jobs", nullptr, nullptr, nullptr) ==
            SQLITE_OK);
    std::size_t commits = 0;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (store->checkpoint_stats().commit_checkpoints_over_bound < 20 &&
           std::chrono::steady_clock::now() < deadline) {
      commit_jobs(*store, 8, 4000, ids);
      ++commits;
    }
    const CheckpointStats blocked = store->checkpoint_stats();
    MESSAGE(commits << " commits while the reader held its snapshot: checkpoint thread "
                    << blocked.checkpoints_started << " passes; commits over the bound "
                    << blocked.commit_checkpoints_over_bound);
    CHECK(blocked.commit_checkpoints_over_bound >= 20);
    CHECK(blocked.wal_restarts == 0);
    CHECK(std::filesystem::file_size(path + "-wal") >= wal_file_bytes(sqlite_wal_bound_pages));
    // The thread that can copy nothing does not run at every commit either.
    CHECK(blocked.checkpoints_started <= commits / 10 + 3);
    CHECK(blocked.failures == 0);

    // Once the reader is gone, the WAL is copied and starts over.
    REQUIRE(sqlite3_exec(reader, "COMMIT", nullptr, nullptr, nullptr) == SQLITE_OK);
    sqlite3_close(reader);
    while (store->checkpoint_stats().wal_restarts == 0 &&
           std::chrono::steady_clock::now() < deadline) {
      commit_jobs(*store, 8, 4000, ids);
    }
    CHECK(store->checkpoint_stats().wal_restarts >= 1);
  }
  check_all_stored(path, ids);
}

TEST_CASE("closing a store while its checkpoint thread copies the WAL keeps every job") {
  TempDir dir;
  const std::string path = dir.file("jobs.db");
  std::vector<std::string> ids;
  {
    auto store = open_sqlite_store(path, true);
    // One commit of about 2,000 pages: the thread has a long pass to make.
    commit_jobs(*store, 500, 16000, ids);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (store->checkpoint_stats().checkpoints_started == 0 &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::yield();
    }
    REQUIRE(store->checkpoint_stats().checkpoints_started == 1);
    // Closed at once: the pass is cut short (or has just ended), the writer's close copies
    // the rest.
  }
  CHECK(!std::filesystem::exists(path + "-wal"));
  check_all_stored(path, ids);
}

namespace {

// A VFS over the default one, made the default while it lives, that watches every store's
// database file (not its -wal or -shm): the bytes written to it since it was last synced, and
// for each sync the thread that made it and how many bytes it had to write out.
class DatabaseSyncWatch {
 public:
  struct Sync {
    std::thread::id thread;    // Who called xSync.
    std::int64_t dirty_bytes;  // Written to the database since the sync before.
  };

  DatabaseSyncWatch() {
    real_ = sqlite3_vfs_find(nullptr);
    REQUIRE(real_ != nullptr);
    vfs_ = *real_;
    vfs_.zName = "squall-database-sync-watch";
    vfs_.szOsFile = static_cast<int>(sizeof(File)) + real_->szOsFile;
    vfs_.pNext = nullptr;
    vfs_.xOpen = &open;
    active_ = this;
    REQUIRE(sqlite3_vfs_register(&vfs_, 1) == SQLITE_OK);
  }
  ~DatabaseSyncWatch() {
    sqlite3_vfs_unregister(&vfs_);
    sqlite3_vfs_register(real_, 1);
    active_ = nullptr;
  }
  DatabaseSyncWatch(const DatabaseSyncWatch&) = delete;
  DatabaseSyncWatch& operator=(const DatabaseSyncWatch&) = delete;

  std::vector<Sync> syncs() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return syncs_;
  }

 private:
  struct File {
    sqlite3_file base;   // Its methods are methods_.
    sqlite3_file* real;  // The default VFS's file, allocated right after this struct.
    bool database;       // The main database file.
  };

  static File* file_of(sqlite3_file* file) { return reinterpret_cast<File*>(file); }
  static sqlite3_file* real(sqlite3_file* file) { return file_of(file)->real; }

  static int open(sqlite3_vfs*, const char* name, sqlite3_file* file, int flags, int* out_flags) {
    DatabaseSyncWatch& watch = *active_;
    File* mine = file_of(file);
    mine->base.pMethods = nullptr;
    mine->real = reinterpret_cast<sqlite3_file*>(mine + 1);
    mine->database = (flags & SQLITE_OPEN_MAIN_DB) != 0;
    const int status = watch.real_->xOpen(watch.real_, name, mine->real, flags, out_flags);
    if (mine->real->pMethods != nullptr) {
      watch.methods_ = *mine->real->pMethods;  // The same for every file of the default VFS.
      watch.methods_.xClose = [](sqlite3_file* f) { return real(f)->pMethods->xClose(real(f)); };
      watch.methods_.xRead = [](sqlite3_file* f, void* data, int amount, sqlite3_int64 offset) {
        return real(f)->pMethods->xRead(real(f), data, amount, offset);
      };
      watch.methods_.xWrite = [](sqlite3_file* f, const void* data, int amount,
                                 sqlite3_int64 offset) {
        if (file_of(f)->database) {
          std::lock_guard<std::mutex> lock(active_->mutex_);
          active_->dirty_bytes_ += amount;
        }
        return real(f)->pMethods->xWrite(real(f), data, amount, offset);
      };
      watch.methods_.xTruncate = [](sqlite3_file* f, sqlite3_int64 size) {
        return real(f)->pMethods->xTruncate(real(f), size);
      };
      watch.methods_.xSync = [](sqlite3_file* f, int sync_flags) {
        if (file_of(f)->database) {
          std::lock_guard<std::mutex> lock(active_->mutex_);
          active_->syncs_.push_back({std::this_thread::get_id(), active_->dirty_bytes_});
          active_->dirty_bytes_ = 0;
        }
        return real(f)->pMethods->xSync(real(f), sync_flags);
      };
      watch.methods_.xFileSize = [](sqlite3_file* f, sqlite3_int64* size) {
        return real(f)->pMethods->xFileSize(real(f), size);
      };
      watch.methods_.xLock = [](sqlite3_file* f, int level) {
        return real(f)->pMethods->xLock(real(f), level);
      };
      watch.methods_.xUnlock = [](sqlite3_file* f, int level) {
        return real(f)->pMethods->xUnlock(real(f), level);
      };
      watch.methods_.xCheckReservedLock = [](sqlite3_file* f, int* out) {
        return real(f)->pMethods->xCheckReservedLock(real(f), out);
      };
      watch.methods_.xFileControl = [](sqlite3_file* f, int op, void* arg) {
        return real(f)->pMethods->xFileControl(real(f), op, arg);
      };
      watch.methods_.xSectorSize = [](sqlite3_file* f) {
        return real(f)->pMethods->xSectorSize(real(f));
      };
      watch.methods_.xDeviceCharacteristics = [](sqlite3_file* f) {
        return real(f)->pMethods->xDeviceCharacteristics(real(f));
      };
      watch.methods_.xShmMap = [](sqlite3_file* f, int region, int size, int extend,
                                  void volatile** out) {
        return real(f)->pMethods->xShmMap(real(f), region, size, extend, out);
      };
      watch.methods_.xShmLock = [](sqlite3_file* f, int offset, int n, int flags) {
        return real(f)->pMethods->xShmLock(real(f), offset, n, flags);
      };
      watch.methods_.xShmBarrier = [](sqlite3_file* f) { real(f)->pMethods->xShmBarrier(real(f)); };
      watch.methods_.xShmUnmap = [](sqlite3_file* f, int delete_flag) {
        return real(f)->pMethods->xShmUnmap(real(f), delete_flag);
      };
      // No memory-mapped reads (xFetch): every read goes through xRead.
      watch.methods_.iVersion = 2;
      mine->base.pMethods = &watch.methods_;
    }
    return status;
  }

  sqlite3_vfs* real_ = nullptr;       // The default VFS, which does the work.
  sqlite3_vfs vfs_{};                 // A copy of it with open() as xOpen.
  sqlite3_io_methods methods_{};      // Forward to the real file's; set at the first open.
  mutable std::mutex mutex_;          // Guards the two below (several threads write, sync).
  std::int64_t dirty_bytes_ = 0;      // Written to the database since its last sync.
  std::vector<Sync> syncs_;           // Every sync of a database file, in order.
  static DatabaseSyncWatch* active_;  // The instance the C callbacks report to.
};

DatabaseSyncWatch* DatabaseSyncWatch::active_ = nullptr;

}  // namespace

TEST_CASE("the checkpoint thread syncs what it copied: a commit copying the tail syncs little") {
  DatabaseSyncWatch watch;
  TempDir dir;
  const std::string path = dir.file("jobs.db");
  std::vector<std::string> ids;
  std::vector<DatabaseSyncWatch::Sync> syncs;
  {
    auto store = open_sqlite_store(path, true);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (store->checkpoint_stats().wal_restarts < 3 &&
           std::chrono::steady_clock::now() < deadline) {
      commit_jobs(*store, 8, 4000, ids);
    }
    REQUIRE(store->checkpoint_stats().wal_restarts >= 3);
    REQUIRE(store->checkpoint_stats().commit_checkpoints >= 1);
    syncs = watch.syncs();  // Before the close, which checkpoints (and syncs) the rest.
  }
  const auto writer = std::this_thread::get_id();
  std::size_t by_thread = 0;
  std::size_t by_writer = 0;
  std::int64_t largest_by_writer = 0;
  for (const auto& sync : syncs) {
    if (sync.thread == writer) {
      ++by_writer;
      largest_by_writer = std::max(largest_by_writer, sync.dirty_bytes);
    } else {
      ++by_thread;
    }
  }
  MESSAGE(by_thread << " database syncs by the checkpoint thread, " << by_writer
                    << " by the writer, the largest of those " << largest_by_writer << " bytes");
  // The pages of each pass were synced by the thread, so the commits that copied a tail (and
  // let the WAL restart) synced only the tail's pages, not the pass's 1,000.
  CHECK(by_thread >= 3);
  CHECK(by_writer >= 1);
  CHECK(largest_by_writer <= static_cast<std::int64_t>(sqlite_wal_tail_pages + 50) * 4096);
  check_all_stored(path, ids);
}

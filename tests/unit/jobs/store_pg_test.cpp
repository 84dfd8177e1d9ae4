// What only the PostgreSQL store does: several nodes on one queue, its schema, a lost
// connection, LISTEN/NOTIFY. The semantics it shares with SQLite are in store_test.cpp.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "squall/jobs/pg_store.hpp"
#include "squall/jobs/store.hpp"
#include "store_backends.hpp"

using squall::jobs::Inserted;
using squall::jobs::Job;
using squall::jobs::JobState;
using squall::jobs::NewJob;
using squall::testing::PostgresBackend;

namespace {

std::string error_of(const std::function<void()>& action) {
  try {
    action();
  } catch (const std::exception& error) {
    return error.what();
  }
  return "";
}

NewJob job(std::string payload, std::string key = "", std::string owner = "") {
  return NewJob{"email", std::move(payload), std::move(key), std::move(owner)};
}

// The URL of `backend` with another application_name, so a test can find its connection.
std::string named(const PostgresBackend& backend, const std::string& application) {
  return backend.location + "&application_name=" + application;
}

void terminate_connections(const PostgresBackend& backend, const std::string& application) {
  PostgresBackend::admin(
      "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '" +
          application + "'",
      backend.location);
}

}  // namespace

TEST_CASE("postgresql: a new database gets squall's tables at the current schema version") {
  PostgresBackend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  backend.open();
  // Opening again (a second node) migrates nothing and refuses nothing.
  auto second = backend.open();
  CHECK(second->count_pending() == 0);
  backend.sql("UPDATE squall_schema SET version = 99");
  const std::string error = error_of([&] { backend.open(); });
  CHECK(error.find(backend.named_in_errors()) != std::string::npos);
  CHECK(error.find("schema version 99 is newer") != std::string::npos);
}

TEST_CASE("postgresql: another program's squall_jobs table is refused untouched") {
  PostgresBackend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  backend.sql("CREATE TABLE squall_jobs (name text); INSERT INTO squall_jobs VALUES ('ann')");
  const std::string error = error_of([&] { backend.open(); });
  CHECK(error.find("another program") != std::string::npos);
  CHECK(error.find("nothing was written") != std::string::npos);
  // No squall_schema was created, and the table is as it was.
  backend.sql(
      "DO $$ BEGIN IF to_regclass('squall_schema') IS NOT NULL OR (SELECT count(*) FROM "
      "squall_jobs) <> 1 THEN RAISE EXCEPTION 'touched'; END IF; END $$");
}

TEST_CASE("postgresql: an unreachable server is named without the password") {
  const std::string url = "postgresql://ann:s3cret@127.0.0.1:1/jobs?connect_timeout=2";
  CHECK(squall::jobs::postgresql_display_url(url) ==
        "postgresql://ann@127.0.0.1:1/jobs?connect_timeout=2");
  CHECK(squall::jobs::postgresql_display_url("postgres://h/db?password=x&user=y") ==
        "postgres://h/db?password=...&user=y");
  const std::string error = error_of([&] { squall::jobs::open_postgresql_store(url, true); });
  CHECK(error.find("job store postgresql://ann@127.0.0.1:1/jobs") != std::string::npos);
  CHECK(error.find("connect") != std::string::npos);
  CHECK(error.find("s3cret") == std::string::npos);
  CHECK(squall::jobs::is_postgresql_url("postgres://x"));
  CHECK_FALSE(squall::jobs::is_postgresql_url("/var/lib/squall/jobs.db"));
}

TEST_CASE("postgresql: two nodes claiming at once never take the same job") {
  PostgresBackend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto writer = backend.open();
  std::vector<NewJob> batch;
  for (int i = 0; i < 400; ++i) batch.push_back(job("p" + std::to_string(i)));
  writer->insert_batch(batch, 1000);

  std::vector<std::vector<std::string>> claimed(2);
  std::vector<std::thread> nodes;
  for (int node = 0; node < 2; ++node) {
    nodes.emplace_back([&, node] {
      auto store = backend.open();
      for (;;) {
        const auto jobs = store->claim(7, 2000, 60'000);
        if (jobs.empty()) return;
        for (const Job& claimed_job : jobs) claimed[node].push_back(claimed_job.id);
      }
    });
  }
  for (auto& thread : nodes) thread.join();
  std::set<std::string> all(claimed[0].begin(), claimed[0].end());
  all.insert(claimed[1].begin(), claimed[1].end());
  CHECK(all.size() == 400);
  CHECK(claimed[0].size() + claimed[1].size() == 400);  // No job twice.
  MESSAGE("node 1 claimed " << claimed[0].size() << ", node 2 " << claimed[1].size());
}

TEST_CASE("postgresql: an Idempotency-Key is unique across nodes, per owner") {
  PostgresBackend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto first = backend.open();
  auto second = backend.open();
  // Not valid UTF-8: keys are bytes, as in SQLite.
  const std::string key = "order-\xff\xfe-1";
  const Inserted a = first->insert_batch({job("one", key, "shop")}, 1000).at(0);
  const Inserted b = second->insert_batch({job("two", key, "shop")}, 2000).at(0);
  CHECK(a.created);
  CHECK_FALSE(b.created);
  CHECK(b.job.id == a.job.id);
  CHECK(b.job.idempotency_key == key);
  CHECK(second->insert_batch({job("three", key, "other")}, 3000).at(0).created);

  // The same key from two nodes at the same moment: one job.
  std::vector<Inserted> results(2);
  std::thread racer(
      [&] { results[1] = second->insert_batch({job("x", "race", "r")}, 4000).at(0); });
  results[0] = first->insert_batch({job("x", "race", "r")}, 4000).at(0);
  racer.join();
  CHECK(results[0].job.id == results[1].job.id);
  CHECK(results[0].created != results[1].created);
}

TEST_CASE(
    "postgresql: a node whose session ended loses its leases at once; a live one keeps them") {
  PostgresBackend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto survivor = backend.open();
  const auto inserted = survivor->insert_batch({job("a"), job("b")}, 1000);
  auto live = backend.open();
  {
    auto doomed = backend.open();
    REQUIRE(doomed->claim(1, 1000, 3'600'000).size() == 1);  // An hour's lease.
    REQUIRE(live->claim(1, 1000, 3'600'000).size() == 1);
    CHECK(survivor->claim(5, 2000, 60'000).empty());  // Both nodes are alive.
  }  // The doomed node's connection ends, as with kill -9.
  // The next look for gone nodes is up to a second away.
  std::vector<Job> taken;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (taken.empty() && std::chrono::steady_clock::now() < deadline) {
    taken = survivor->claim(5, 3000, 60'000);
    if (taken.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  REQUIRE(taken.size() == 1);  // Not the live node's job.
  CHECK(taken[0].attempts == 2);
  CHECK(taken[0].lease_until_ms == 63'000);
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  CHECK(survivor->claim(5, 4000, 60'000).empty());  // The live node's lease still holds.
}

TEST_CASE("postgresql: a lost connection fails calls at once, then reconnects with backoff") {
  PostgresBackend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = squall::jobs::open_postgresql_store(named(backend, "squall_victim"), true);
  const std::string id = store->insert_batch({job("kept")}, 1000).at(0).job.id;
  terminate_connections(backend, "squall_victim");
  // The first call finds the connection gone; the store tries to connect again at once.
  std::string error = error_of([&] { store->insert_batch({job("lost")}, 2000); });
  CHECK_FALSE(error.empty());
  // Connected again (the server is up): the next calls work, and nothing half-done was kept.
  bool worked = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!worked && std::chrono::steady_clock::now() < deadline) {
    worked = error_of([&] { store->probe_write(3000); }).empty();
    if (!worked) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  REQUIRE(worked);
  CHECK(store->get(id)->payload == "kept");
  CHECK(store->count_pending() == 1);
  CHECK(store->insert_batch({job("after")}, 4000).at(0).created);
  CHECK(store->claim(5, 5000, 60'000).size() == 2);
}

TEST_CASE("postgresql: probe_write fails while another connection locks the probe, then succeeds") {
  PostgresBackend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  auto store = backend.open(true);
  store->probe_write(1);
  PGconn* other = PQconnectdb(backend.location.c_str());
  REQUIRE(PQstatus(other) == CONNECTION_OK);
  PQclear(PQexec(other, "BEGIN; LOCK TABLE squall_probe IN ACCESS EXCLUSIVE MODE"));
  // The store waits its lock_timeout (5 s), as SQLite its busy timeout, and reports the lock.
  const auto started = std::chrono::steady_clock::now();
  const std::string error = error_of([&] { store->probe_write(2); });
  CHECK(std::chrono::steady_clock::now() - started >= std::chrono::seconds(4));
  CHECK(error.find("probe_write") != std::string::npos);
  CHECK(error.find("lock timeout") != std::string::npos);
  PQclear(PQexec(other, "COMMIT"));
  PQfinish(other);
  store->probe_write(3);
}

TEST_CASE("postgresql: JobNotifier wakes on another node's insert, not on a rolled-back one") {
  PostgresBackend backend;
  SQUALL_REQUIRE_BACKEND(backend);
  std::mutex mutex;
  std::condition_variable changed;
  int wakeups = 0;
  squall::jobs::JobNotifier notifier(backend.location, [&] {
    std::lock_guard<std::mutex> lock(mutex);
    ++wakeups;
    changed.notify_all();
  });
  const auto wait_for = [&](int count) {
    std::unique_lock<std::mutex> lock(mutex);
    return changed.wait_for(lock, std::chrono::seconds(5), [&] { return wakeups >= count; });
  };
  REQUIRE(wait_for(1));  // The first call, once listening.
  REQUIRE(notifier.listening());
  auto store = backend.open();
  backend.sql(PostgresBackend::boom_trigger);
  CHECK_THROWS(store->insert_batch({job("a"), NewJob{"boom", "", ""}}, 1000));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  {
    std::lock_guard<std::mutex> lock(mutex);
    CHECK(wakeups == 1);  // The rolled-back insert notified nobody.
  }
  store->insert_batch({job("b")}, 1000);
  CHECK(wait_for(2));
  notifier.stop();
  notifier.stop();  // Idempotent.
}

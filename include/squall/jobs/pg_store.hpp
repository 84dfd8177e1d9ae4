// The PostgreSQL job store: one queue shared by several squalld nodes. Claims take rows with
// FOR UPDATE SKIP LOCKED, so two nodes never lease the same job; each lease names the node
// that holds it, and every node holds a session-level advisory lock on its number for as long
// as its connection lives, so a node that can take another's lock knows it is gone and takes
// over its leases at once. Inserts NOTIFY the other nodes (JobNotifier). Blocking, like every
// JobStore: used by the StoreWorker's thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>

#include "squall/jobs/store.hpp"

namespace squall::jobs {

// Whether a [jobs] store value names a PostgreSQL database ("postgresql://..." or
// "postgres://...") rather than a SQLite file.
bool is_postgresql_url(std::string_view location) noexcept;

// The URL without its password, if any (for logs and errors).
std::string postgresql_display_url(std::string_view url);

// Connects to the database at `url` (a libpq URI), creates or migrates squall's tables
// (squall_schema, squall_jobs, squall_probe; in the connection's first search_path schema)
// and takes a node number. synchronous_commit: every commit waits for the server's WAL flush
// (durability "full"); otherwise the server may lose the last commits if it crashes (it never
// loses them when a squalld dies). Throws std::runtime_error naming the URL (without password).
// A lost connection is re-established by the next call once its backoff (100 ms doubling to
// 5 s) has passed; calls before that fail at once.
std::unique_ptr<JobStore> open_postgresql_store(const std::string& url, bool synchronous_commit);

// The schema version open_postgresql_store creates and upgrades to (squall_schema.version).
inline constexpr int postgresql_schema_version = 2;
// The first key of squall's advisory locks (two-key form): "Sqal", as SQLite's application id.
inline constexpr std::int32_t postgresql_lock_class = 0x5371616c;
// The channel inserts and releases NOTIFY.
inline constexpr std::string_view postgresql_notify_channel = "squall_jobs";

// LISTENs on postgresql_notify_channel on its own connection and thread, and calls `on_jobs`
// (from that thread) once per wake-up in which notifications arrived, and once after each
// (re)connection, since notifications sent while nobody listened are lost. A lost connection
// is retried with backoff (100 ms doubling to 5 s). `on_jobs` must be quick and thread-safe
// (e.g. Loop::call_soon).
class JobNotifier {
 public:
  JobNotifier(std::string url, std::function<void()> on_jobs);
  // Calls stop().
  ~JobNotifier();
  JobNotifier(const JobNotifier&) = delete;
  JobNotifier& operator=(const JobNotifier&) = delete;

  // Ends the thread; `on_jobs` is not called afterwards. Idempotent.
  void stop();
  // Whether the LISTEN is in force now (for tests).
  bool listening() const noexcept { return listening_.load(std::memory_order_acquire); }

 private:
  void thread_main();

  std::string url_;                     // The database.
  std::function<void()> on_jobs_;       // Called from the thread.
  int stop_fd_ = -1;                    // eventfd: written by stop(), polled by the thread.
  std::atomic<bool> listening_{false};  // See listening().
  std::thread thread_;                  // Started last.
};

}  // namespace squall::jobs

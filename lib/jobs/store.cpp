#include "squall/jobs/store.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>

#include <fcntl.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <spdlog/spdlog.h>
#include <sqlite3.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/background_thread.hpp"

namespace squall::jobs {

namespace {

constexpr std::array<std::string_view, job_state_count> state_names = {
    "queued", "sending", "retrying", "sent", "failed"};

// Fills `out` from the kernel's CSPRNG. getrandom may return fewer bytes than asked (above
// 256) or be interrupted, so it loops; it blocks only before the pool is first seeded.
void fill_random(unsigned char* out, std::size_t size) {
  while (size > 0) {
    const ssize_t got = ::getrandom(out, size, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      throw std::system_error(errno, std::generic_category(), "getrandom");
    }
    out += got;
    size -= static_cast<std::size_t>(got);
  }
}

constexpr std::size_t kJobIdRandomBytes = 10;  // After 6 bytes of milliseconds.

std::string hex_id(const unsigned char* bytes) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string id(32, '\0');
  for (std::size_t i = 0; i < 16; ++i) {
    id[2 * i] = digits[bytes[i] >> 4];
    id[2 * i + 1] = digits[bytes[i] & 0x0f];
  }
  return id;
}

// 48 bits of milliseconds, then 80 random bits: ids of one batch land on neighbouring index
// pages, so a group commit writes a few pages instead of one per job (measured: 2-3x the
// durable inserts per second). The creation time is public in GET /jobs/{id} anyway.
std::string job_id(std::int64_t now_ms, const unsigned char* random) {
  unsigned char bytes[16];
  const auto now = static_cast<std::uint64_t>(now_ms);
  for (int i = 0; i < 6; ++i) bytes[i] = static_cast<unsigned char>(now >> (8 * (5 - i)));
  std::memcpy(bytes + 6, random, kJobIdRandomBytes);
  return hex_id(bytes);
}

// Schema version 1, as squall first created it (migrate_to_1). seq is the rowid alias: it keeps
// inserts appending to the table's B-tree (random ids would scatter the rows) and breaks the last
// ties of claim's order in insertion order. The idempotency index is partial so that jobs without a
// key never collide. jobs_due serves claim's order (run_after_ms, created_ms, seq) and, as a
// covering index, stats' oldest waiting job without reading a single row.
constexpr const char* schema_v1_sql = R"sql(
CREATE TABLE IF NOT EXISTS jobs (
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
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency_key ON jobs (idempotency_key)
  WHERE idempotency_key <> '';
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, run_after_ms, created_ms);
)sql";

// Version 2 (migrate_to_2): retention and privacy. A sent job's payload is deleted, so its
// digest is kept for Idempotency-Key comparisons; jobs_finished serves the purge of old
// finished jobs in finishing order; store_probe is what probe_write writes; the application
// id marks the file as a squall store.
constexpr const char* schema_v2_sql = R"sql(
ALTER TABLE jobs ADD COLUMN payload_digest BLOB NOT NULL DEFAULT X'';
CREATE INDEX jobs_finished ON jobs (finished_ms) WHERE finished_ms > 0;
CREATE TABLE store_probe (id INTEGER PRIMARY KEY CHECK (id = 1), written_ms INTEGER NOT NULL);
)sql";

// Version 3 (migrate_to_3): every job has an owner (the API token that created it; '' for
// jobs stored before, and for anonymous callers), and an Idempotency-Key is unique per owner,
// so one client can neither collide with nor learn about another's keys.
constexpr const char* schema_v3_sql = R"sql(
ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
DROP INDEX IF EXISTS jobs_idempotency_key;
CREATE UNIQUE INDEX jobs_owner_idempotency_key ON jobs (owner, idempotency_key)
  WHERE idempotency_key <> '';
)sql";

// Version 4 (migrate_to_4): a finished job's webhook (WebhookState as an integer, its
// attempts and when it is due); jobs_webhooks_due holds the owed ones only, so claims and the
// pending count never read finished jobs whose webhook is settled.
constexpr const char* schema_v4_sql = R"sql(
ALTER TABLE jobs ADD COLUMN webhook_state INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN webhook_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN webhook_due_ms INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_webhooks_due ON jobs (webhook_due_ms) WHERE webhook_state = 1;
)sql";

// Version 5 (migrate_to_5): the state CHECK of version 1 written as comparisons. SQLite 3.40
// codes a constant IN list of more than two values as a temporary B-tree built afresh each
// time the constraint is checked, that is by every INSERT and every UPDATE of state: about
// 30,000 instructions per statement (opening an in-memory B-tree, zeroing its page), a third
// of a durable insert's. The comparisons admit exactly the same states, so no row changes:
// only the table's text in sqlite_schema does (SQLite's documented procedure for changing a
// CHECK constraint in place, lang_altertable.html#otheralter).
constexpr const char* state_check_v1 =
    "CHECK (state IN ('queued', 'sending', 'retrying', 'sent', 'failed'))";
constexpr const char* state_check_v5 =
    "CHECK (state = 'queued' OR state = 'sending' OR state = 'retrying' OR state = 'sent' OR "
    "state = 'failed')";

// The columns read_job expects, in its order.
#define SQUALL_JOB_COLUMNS                                                                    \
  "id, kind, state, payload, idempotency_key, attempts, last_error, created_ms, updated_ms, " \
  "run_after_ms, lease_until_ms, finished_ms, payload_digest, owner, webhook_state, "         \
  "webhook_attempts, webhook_due_ms"

constexpr const char* insert_sql =
    "INSERT INTO jobs (id, kind, state, payload, idempotency_key, created_ms, updated_ms, "
    "run_after_ms, payload_digest, owner) VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?5, ?5, ?6, ?7) "
    "ON CONFLICT (owner, idempotency_key) WHERE idempotency_key <> '' DO NOTHING";
constexpr const char* get_by_id_sql = "SELECT " SQUALL_JOB_COLUMNS " FROM jobs WHERE id = ?1";
constexpr const char* get_by_key_sql =
    "SELECT " SQUALL_JOB_COLUMNS
    " FROM jobs WHERE owner = ?2 AND idempotency_key = ?1 AND idempotency_key <> ''";
// Each branch walks jobs_due in order and stops after ?3 rows, so a claim costs O(max) even
// with a million due jobs; a single OR query would sort every due row first. Expired leases
// are found among the sending rows, which are few (bounded by the runner's concurrency).
// Waiting jobs held by a prefetch (lease_until_ms in the future) are skipped: they are the
// oldest due ones, so each branch steps over at most the held count.
#define SQUALL_DUE_SEQS                                                                       \
  "SELECT seq FROM ("                                                                         \
  "SELECT * FROM (SELECT seq, run_after_ms, created_ms FROM jobs WHERE state = 'queued' AND " \
  "run_after_ms <= ?1 AND lease_until_ms < ?1 ORDER BY run_after_ms, created_ms, seq LIMIT "  \
  "?3) "                                                                                      \
  "UNION ALL SELECT * FROM (SELECT seq, run_after_ms, created_ms FROM jobs WHERE state = "    \
  "'retrying' AND run_after_ms <= ?1 AND lease_until_ms < ?1 ORDER BY run_after_ms, "         \
  "created_ms, seq LIMIT ?3) "                                                                \
  "UNION ALL SELECT * FROM (SELECT seq, run_after_ms, created_ms FROM jobs WHERE state = "    \
  "'sending' AND lease_until_ms < ?1 ORDER BY run_after_ms, created_ms, seq LIMIT ?3) "       \
  "ORDER BY run_after_ms, created_ms, seq LIMIT ?3)"
constexpr const char* claim_sql =
    "UPDATE jobs SET state = 'sending', attempts = attempts + 1, lease_until_ms = ?2, "
    "updated_ms = ?1 WHERE seq IN (" SQUALL_DUE_SEQS ") RETURNING " SQUALL_JOB_COLUMNS ", seq";
// A hold leaves a waiting job's state and attempts as they are; an expired sending one's
// attempt is over, so it waits again as retrying.
constexpr const char* hold_sql =
    "UPDATE jobs SET state = CASE WHEN state = 'sending' THEN 'retrying' ELSE state END, "
    "lease_until_ms = ?2, updated_ms = ?1 WHERE seq IN (" SQUALL_DUE_SEQS
    ") RETURNING " SQUALL_JOB_COLUMNS ", seq";
#undef SQUALL_DUE_SEQS
constexpr int claim_seq_column = 17;  // After the SQUALL_JOB_COLUMNS.
constexpr const char* start_sql =
    "UPDATE jobs SET state = 'sending', attempts = attempts + 1, lease_until_ms = ?3, "
    "updated_ms = ?2 WHERE id = ?1 AND state IN ('queued', 'retrying')";
// The payload (addresses, Bcc, the text) is deleted once sent: only its digest stays.
// ?3 (webhooks on) makes the job's webhook owed in the same statement.
#define SQUALL_WEBHOOK_OWED                                                               \
  "webhook_state = CASE WHEN ?3 THEN 1 ELSE webhook_state END, webhook_attempts = CASE "  \
  "WHEN ?3 THEN 0 ELSE webhook_attempts END, webhook_due_ms = CASE WHEN ?3 THEN ?2 ELSE " \
  "webhook_due_ms END"
constexpr const char* mark_sent_sql =
    "UPDATE jobs SET state = 'sent', payload = X'', lease_until_ms = 0, updated_ms = ?2, "
    "finished_ms = ?2, " SQUALL_WEBHOOK_OWED " WHERE id = ?1 AND state <> 'sent'";
constexpr const char* mark_retry_sql =
    "UPDATE jobs SET state = 'retrying', last_error = ?2, run_after_ms = ?3, lease_until_ms = 0, "
    "updated_ms = ?4 WHERE id = ?1 AND state = 'sending'";
constexpr const char* mark_failed_sql =
    "UPDATE jobs SET state = 'failed', last_error = ?4, lease_until_ms = 0, updated_ms = ?2, "
    "finished_ms = ?2, " SQUALL_WEBHOOK_OWED " WHERE id = ?1 AND state = 'sending'";
#undef SQUALL_WEBHOOK_OWED
// A sending job goes back to the queue uncounted; a held one only loses its hold.
constexpr const char* release_sql =
    "UPDATE jobs SET state = CASE WHEN state = 'sending' THEN 'queued' ELSE state END, "
    "attempts = CASE WHEN state = 'sending' THEN max(attempts - 1, 0) ELSE attempts END, "
    "lease_until_ms = 0, updated_ms = ?2 WHERE id = ?1 AND (state = 'sending' OR (state IN "
    "('queued', 'retrying') AND lease_until_ms > 0))";
// A job whose webhook is still owed stays until it is delivered or given up.
constexpr const char* purge_sql =
    "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE finished_ms > 0 AND "
    "finished_ms < ?1 AND webhook_state <> 1 ORDER BY finished_ms LIMIT ?2)";
constexpr const char* claim_webhooks_sql =
    "UPDATE jobs SET webhook_attempts = webhook_attempts + 1, webhook_due_ms = ?2 "
    "WHERE seq IN (SELECT seq FROM jobs WHERE webhook_state = 1 AND webhook_due_ms <= ?1 "
    "ORDER BY webhook_due_ms LIMIT ?3) RETURNING " SQUALL_JOB_COLUMNS ", seq";
constexpr const char* mark_webhook_sql =
    "UPDATE jobs SET webhook_state = ?2, webhook_due_ms = ?3 WHERE id = ?1 AND webhook_state = 1";
constexpr const char* release_webhook_sql =
    "UPDATE jobs SET webhook_due_ms = ?2, webhook_attempts = max(webhook_attempts - 1, 0) "
    "WHERE id = ?1 AND webhook_state = 1";
constexpr const char* count_webhooks_sql = "SELECT count(*) FROM jobs WHERE webhook_state = 1";
constexpr const char* expire_leases_sql =
    "UPDATE jobs SET lease_until_ms = 0, updated_ms = ?1 WHERE state = 'sending'";
// Walks the waiting jobs (jobs_due): run once, when a process takes the store over.
constexpr const char* expire_holds_sql =
    "UPDATE jobs SET lease_until_ms = 0, updated_ms = ?1 WHERE state IN ('queued', 'retrying') "
    "AND lease_until_ms > 0";
constexpr const char* probe_sql =
    "INSERT INTO store_probe (id, written_ms) VALUES (1, ?1) "
    "ON CONFLICT (id) DO UPDATE SET written_ms = excluded.written_ms";
constexpr const char* count_pending_sql =
    "SELECT count(*) FROM jobs WHERE state IN ('queued', 'retrying', 'sending')";
constexpr const char* pending_by_owner_sql =
    "SELECT owner, count(*), sum(length(payload)) FROM jobs "
    "WHERE state IN ('queued', 'retrying', 'sending') GROUP BY owner";
constexpr const char* count_by_state_sql = "SELECT state, count(*) FROM jobs GROUP BY state";
constexpr const char* oldest_queued_sql =
    "SELECT min(created_ms) FROM jobs WHERE state IN ('queued', 'retrying')";

#undef SQUALL_JOB_COLUMNS

// A prepared statement, prepared once for the connection's life.
class Statement {
 public:
  Statement() = default;
  ~Statement() { sqlite3_finalize(stmt_); }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;

  sqlite3_stmt* get() const noexcept { return stmt_; }
  sqlite3_stmt** out() noexcept { return &stmt_; }

 private:
  sqlite3_stmt* stmt_ = nullptr;  // Finalized with the store.
};

// Leaves a statement ready for its next use however the current one ends, and drops the
// bindings, which point into the caller's strings.
class StatementUse {
 public:
  explicit StatementUse(const Statement& statement) noexcept : stmt_(statement.get()) {}
  ~StatementUse() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }
  StatementUse(const StatementUse&) = delete;
  StatementUse& operator=(const StatementUse&) = delete;

  sqlite3_stmt* get() const noexcept { return stmt_; }

 private:
  sqlite3_stmt* stmt_;  // Borrowed from a Statement.
};

std::string column_string(sqlite3_stmt* stmt, int column) {
  // Blob access works for TEXT too and never stops at an embedded NUL.
  const void* data = sqlite3_column_blob(stmt, column);
  const int size = sqlite3_column_bytes(stmt, column);
  if (data == nullptr || size <= 0) return {};
  return std::string(static_cast<const char*>(data), static_cast<std::size_t>(size));
}

// The WAL pages a checkpoint copied that were not copied before it, from the copied counts
// SQLite reports before and after. Fewer after than before: the WAL started over meanwhile, so
// every page copied is new.
int pages_newly_copied(int copied, int copied_before) noexcept {
  return copied >= copied_before ? copied - copied_before : copied;
}

class SqliteJobStore final : public JobStore {
 public:
  SqliteJobStore(const std::string& path, bool synchronous_full);
  ~SqliteJobStore() override;

  std::vector<Inserted> insert_batch(std::vector<NewJob> jobs, std::int64_t now_ms) override;
  std::optional<Job> get(std::string_view id) override;
  std::vector<Job> claim(std::size_t max, std::int64_t now_ms, std::int64_t lease_ms) override;
  std::vector<Job> hold(std::size_t max, std::int64_t now_ms, std::int64_t lease_ms) override;
  bool start(std::string_view id, std::int64_t now_ms, std::int64_t lease_ms) override;
  bool mark_sent(std::string_view id, std::int64_t now_ms) override;
  bool mark_retry(std::string_view id, std::string_view error, std::int64_t run_after_ms,
                  std::int64_t now_ms) override;
  bool mark_failed(std::string_view id, std::string_view error, std::int64_t now_ms) override;
  bool release(std::string_view id, std::int64_t now_ms) override;
  std::int64_t count_pending() override;
  std::vector<OwnerUsage> pending_by_owner() override;
  StoreStats stats(std::int64_t now_ms) override;
  void transaction(const std::function<void()>& body) override;
  std::size_t purge_finished(std::int64_t finished_before_ms, std::size_t max_jobs) override;
  std::int64_t compact(std::int64_t max_pages) override;
  std::size_t expire_all_leases(std::int64_t now_ms) override;
  void probe_write(std::int64_t now_ms) override;
  void set_webhooks(bool on) override { webhooks_ = on; }
  std::vector<Job> claim_webhooks(std::size_t max, std::int64_t now_ms,
                                  std::int64_t lease_ms) override;
  bool mark_webhook(std::string_view id, WebhookState state, std::int64_t due_ms,
                    std::int64_t now_ms) override;
  bool release_webhook(std::string_view id, std::int64_t now_ms) override;
  std::int64_t count_webhooks_owed() override;
  CheckpointStats checkpoint_stats() const noexcept override;

 private:
  // A write transaction that nests: only the outermost one begins and commits. Any scope
  // left without commit() dooms the whole transaction, so a caller that catches an inner
  // failure cannot commit half of an insert_batch.
  class Transaction {
   public:
    Transaction(SqliteJobStore& store, const char* operation);
    ~Transaction();
    Transaction(const Transaction&) = delete;
    Transaction& operator=(const Transaction&) = delete;
    void commit();

   private:
    SqliteJobStore& store_;   // The store whose transaction this is.
    const char* operation_;   // Named in errors.
    bool committed_ = false;  // commit() ran for this scope.
  };

  [[noreturn]] void fail(const char* operation) const;
  void prepare(Statement& statement, const char* sql, const char* operation = "prepare");
  void exec(const char* sql, const char* operation);
  bool step(sqlite3_stmt* stmt, const char* operation);
  void bind_text(sqlite3_stmt* stmt, int index, std::string_view text, const char* operation);
  void bind_int(sqlite3_stmt* stmt, int index, std::int64_t value, const char* operation);
  Job read_job(sqlite3_stmt* stmt, const char* operation) const;
  // claim() and hold(): `statement` (claim_sql or hold_sql) in a transaction of its own, or
  // of the caller's; the jobs in claim order.
  std::vector<Job> take_due(const Statement& statement, const char* operation, std::size_t max,
                            std::int64_t now_ms, std::int64_t lease_ms);
  std::optional<Job> find(const Statement& statement, std::string_view key, const char* operation,
                          const std::string* owner = nullptr);
  bool run_update(const Statement& statement, const char* operation);
  void rollback() noexcept;
  std::int64_t pragma_int(const char* pragma, const char* operation);
  void check_owner_and_version(int version);
  void migrate(int from_version);
  void migrate_to_1();
  void migrate_to_2();
  void migrate_to_3();
  void migrate_to_4();
  void migrate_to_5();

  // The WAL's checkpoints, off the commit path (see open_sqlite_store in store.hpp).
  // Opens the checkpoint thread's connection and installs the WAL hook. The thread itself
  // starts with the first pass a commit wants (a store that never grows its WAL to the
  // threshold, or a process that forks after opening one, runs no thread).
  void start_checkpointer(bool synchronous_full);
  // Starts the thread (checkpoint_mutex_ held); false if the system refuses a thread.
  bool start_checkpoint_thread() noexcept;
  // Stops a pass under way, joins the thread and closes its connection. Idempotent.
  void stop_checkpointer() noexcept;
  void checkpointer_main() noexcept;
  // fdatasync of the database file through the checkpoint connection; an SQLite status.
  int sync_database() noexcept;
  // The writing connection's WAL hook (sqlite3_wal_hook): after every commit, with the
  // WAL's length in pages. Replaces SQLite's auto-checkpoint.
  static int on_wal_commit(void* store, sqlite3* db, const char* database, int frames) noexcept;
  void after_commit(int frames) noexcept;
  // A PASSIVE checkpoint on the writing connection, from after_commit.
  void commit_checkpoint(int frames, int copied_before, bool over_bound) noexcept;

  // The schema's history: migrations[i] upgrades user_version i to i + 1, inside the one
  // transaction that also sets user_version, so a failure leaves the file as it was. A new
  // version adds one member function and one entry here (sqlite_schema_version follows).
  static constexpr void (SqliteJobStore::*migrations[])() = {
      &SqliteJobStore::migrate_to_1, &SqliteJobStore::migrate_to_2, &SqliteJobStore::migrate_to_3,
      &SqliteJobStore::migrate_to_4, &SqliteJobStore::migrate_to_5,
  };
  static_assert(std::size(migrations) == sqlite_schema_version);

  std::string path_;                 // Named in every error.
  sqlite3* db_ = nullptr;            // The connection; closed after every statement is finalized.
  int transaction_depth_ = 0;        // Nested Transaction scopes open now.
  bool transaction_doomed_ = false;  // An inner scope failed: the outermost rolls back.
  Statement begin_;                  // BEGIN IMMEDIATE: take the write lock up front, no upgrade.
  Statement commit_;                 // COMMIT.
  Statement rollback_;               // ROLLBACK.
  Statement insert_;                 // insert_sql.
  Statement get_by_id_;              // get_by_id_sql.
  Statement get_by_key_;             // get_by_key_sql.
  Statement claim_;                  // claim_sql.
  Statement hold_;                   // hold_sql.
  Statement start_;                  // start_sql.
  Statement expire_holds_;           // expire_holds_sql.
  Statement mark_sent_;              // mark_sent_sql.
  Statement mark_retry_;             // mark_retry_sql.
  Statement mark_failed_;            // mark_failed_sql.
  Statement release_;                // release_sql.
  Statement count_pending_;          // count_pending_sql.
  Statement pending_by_owner_;       // pending_by_owner_sql.
  Statement count_by_state_;         // count_by_state_sql.
  Statement oldest_queued_;          // oldest_queued_sql.
  Statement begin_read_;             // BEGIN (deferred): stats reads one snapshot.
  Statement purge_;                  // purge_sql.
  Statement expire_leases_;          // expire_leases_sql.
  Statement probe_;                  // probe_sql.
  Statement claim_webhooks_;         // claim_webhooks_sql.
  Statement mark_webhook_;           // mark_webhook_sql.
  Statement count_webhooks_;         // count_webhooks_sql.
  Statement release_webhook_;        // release_webhook_sql.
  bool webhooks_ = false;            // set_webhooks: finishing a job makes its webhook owed.

  // The checkpoint thread. It and the writer's WAL hook share the fields below the mutex.
  sqlite3* checkpoint_db_ = nullptr;           // Its own connection: it only ever checkpoints.
  std::mutex checkpoint_mutex_;                // Guards the fields from here to checkpointer_.
  std::condition_variable checkpoint_wakeup_;  // checkpoint_wanted_ or _stopping_ was set.
  bool checkpoint_wanted_ = false;             // A commit asks for a pass.
  bool checkpoint_running_ = false;            // A pass is under way on the thread.
  bool checkpoint_stopping_ = false;           // The store closes: the thread ends.
  int wal_frames_ = 0;                         // The WAL's length (pages) after the last commit.
  int wal_copied_ = 0;  // Of those, copied into the database, as the last checkpoint said.
  // A pass is wanted once the WAL is this long (pages); 0: at the next commit.
  int checkpoint_next_wake_ = sqlite_wal_checkpoint_pages;
  // A commit copied the tail since the last pass or restart: if the WAL did not start over (a
  // reader's snapshot), the next tail waits for the thread's next pass, not every commit.
  bool tail_copied_ = false;
  std::thread checkpointer_;  // Runs checkpointer_main from the first pass wanted to the close.
  bool checkpoint_thread_refused_ = false;  // Writer only: std::thread failed; commits checkpoint.
  bool checkpoint_failing_ = false;         // Thread only: its last pass failed (logged once).
  bool commit_checkpoint_failing_ = false;  // Writer only: its last checkpoint failed.
  struct {
    std::atomic<std::uint64_t> checkpoints{0};
    std::atomic<std::uint64_t> checkpoints_started{0};
    std::atomic<std::uint64_t> pages{0};
    std::atomic<std::uint64_t> commit_checkpoints{0};
    std::atomic<std::uint64_t> commit_checkpoints_over_bound{0};
    std::atomic<std::uint64_t> commit_pages{0};
    std::atomic<std::uint64_t> wal_restarts{0};
    std::atomic<std::uint64_t> failures{0};
  } checkpoint_counts_;  // See CheckpointStats.
};

// A store file that does not exist yet is created here, mode 0600 whatever the umask: SQLite
// would create it 0644 & ~umask, and it gives the -wal and -shm files the database's mode.
// Jobs hold addresses and message text. An existing file keeps the mode its owner gave it.
void create_private_file(const std::string& path) {
  if (path.empty() || path == ":memory:" || path.starts_with("file:")) return;
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return;  // It exists (or cannot be made): SQLite's open reports the problem.
  const int chmod_status = ::fchmod(fd, 0600);
  const int chmod_errno = errno;
  ::close(fd);
  if (chmod_status != 0) {
    throw std::runtime_error("job store " + path + ": chmod 0600: " + std::strerror(chmod_errno));
  }
}

SqliteJobStore::SqliteJobStore(const std::string& path, bool synchronous_full) : path_(path) {
  create_private_file(path);
  // NOMUTEX: the store is used by one thread at a time (the StoreWorker), so SQLite's
  // per-connection mutex would only cost time.
  const int open_status =
      sqlite3_open_v2(path.c_str(), &db_,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nullptr);
  if (open_status != SQLITE_OK) {
    std::string message = "job store " + path_ + ": open: ";
    message += db_ != nullptr ? sqlite3_errmsg(db_) : sqlite3_errstr(open_status);
    const int system_errno = db_ != nullptr ? sqlite3_system_errno(db_) : 0;
    if (system_errno != 0) message += std::string(" (") + std::strerror(system_errno) + ")";
    if (open_status == SQLITE_CANTOPEN) message += "; does its directory exist and is it writable?";
    sqlite3_close(db_);
    db_ = nullptr;
    throw std::runtime_error(message);
  }
  try {
    sqlite3_extended_result_codes(db_, 1);
    // SQLite quietly opens a write-protected file read-only; every insert would then fail.
    if (sqlite3_db_readonly(db_, "main") == 1) {
      throw std::runtime_error("job store " + path_ + ": open: the file is read-only");
    }
    // Another process (an admin reading the file) may hold a lock for a moment.
    if (sqlite3_busy_timeout(db_, 5000) != SQLITE_OK) fail("busy_timeout");

    // Who owns the file and which version it has are read before anything is written, so
    // neither a newer store nor another program's file is touched (not even switched to WAL).
    // Reading is also where a non-SQLite file is detected.
    const int version = static_cast<int>(pragma_int("PRAGMA user_version", "read user_version"));
    check_owner_and_version(version);

    // Compaction (retention deletes jobs): the free pages of deleted rows can be given back to
    // the file system a few at a time (compact()). A new file gets the mode before its first
    // table; an existing one is rebuilt once by VACUUM, which takes as long as copying it.
    if (pragma_int("PRAGMA auto_vacuum", "read auto_vacuum") != 2) {
      exec("PRAGMA auto_vacuum=INCREMENTAL", "set auto_vacuum=INCREMENTAL");
      if (version > 0) exec("VACUUM", "convert the store to auto_vacuum=INCREMENTAL (VACUUM)");
    }

    // WAL: readers do not block the writer, and a commit appends to one file (one fsync).
    // journal_mode answers with the mode in force, which is not WAL on some file systems.
    {
      Statement journal_mode;
      prepare(journal_mode, "PRAGMA journal_mode=WAL", "set journal_mode=WAL");
      StatementUse use(journal_mode);
      std::string mode;
      if (step(use.get(), "set journal_mode=WAL")) mode = column_string(use.get(), 0);
      if (mode != "wal") {
        throw std::runtime_error("job store " + path_ +
                                 ": set journal_mode=WAL: the database stayed in mode '" + mode +
                                 "' (a file system without shared memory?)");
      }
    }
    exec(synchronous_full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL",
         "set synchronous");
    // A long reader (an admin's query) can make the WAL grow; after the next checkpoint the
    // file is truncated back to this size instead of keeping its peak forever.
    exec("PRAGMA journal_size_limit=67108864", "set journal_size_limit");

    if (version < sqlite_schema_version) migrate(version);

    prepare(begin_, "BEGIN IMMEDIATE");
    prepare(commit_, "COMMIT");
    prepare(rollback_, "ROLLBACK");
    prepare(insert_, insert_sql);
    prepare(get_by_id_, get_by_id_sql);
    prepare(get_by_key_, get_by_key_sql);
    prepare(claim_, claim_sql);
    prepare(hold_, hold_sql);
    prepare(start_, start_sql);
    prepare(expire_holds_, expire_holds_sql);
    prepare(mark_sent_, mark_sent_sql);
    prepare(mark_retry_, mark_retry_sql);
    prepare(mark_failed_, mark_failed_sql);
    prepare(release_, release_sql);
    prepare(count_pending_, count_pending_sql);
    prepare(pending_by_owner_, pending_by_owner_sql);
    prepare(count_by_state_, count_by_state_sql);
    prepare(oldest_queued_, oldest_queued_sql);
    prepare(begin_read_, "BEGIN");
    prepare(purge_, purge_sql);
    prepare(expire_leases_, expire_leases_sql);
    prepare(probe_, probe_sql);
    prepare(claim_webhooks_, claim_webhooks_sql);
    prepare(mark_webhook_, mark_webhook_sql);
    prepare(count_webhooks_, count_webhooks_sql);
    prepare(release_webhook_, release_webhook_sql);
    start_checkpointer(synchronous_full);
  } catch (...) {
    // The destructor does not run; the prepared members are finalized after this, and
    // sqlite3_close_v2 waits for them.
    stop_checkpointer();
    sqlite3_close_v2(db_);
    db_ = nullptr;
    throw;
  }
}

SqliteJobStore::~SqliteJobStore() {
  // The checkpoint thread's connection closes first, so that the writer's is the last one:
  // its close checkpoints the whole WAL and deletes the file.
  stop_checkpointer();
  // sqlite3_close_v2 defers the close until the statements (members, destroyed after this
  // body) are finalized, so the order of destruction does not matter.
  sqlite3_close_v2(db_);
}

void SqliteJobStore::start_checkpointer(bool synchronous_full) {
  // The file itself, whatever URI or relative path opened it.
  const char* file = sqlite3_db_filename(db_, "main");
  if (file == nullptr || file[0] == '\0') return;  // A temporary database: nothing to share.
  const std::string operation = "open the WAL checkpoint connection";
  auto failed = [&](const std::string& what) {
    std::string message = "job store " + path_ + ": " + operation + ": " + what;
    sqlite3_close_v2(checkpoint_db_);
    checkpoint_db_ = nullptr;
    throw std::runtime_error(message);
  };
  const int open_status =
      sqlite3_open_v2(file, &checkpoint_db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, nullptr);
  if (open_status != SQLITE_OK) {
    failed(checkpoint_db_ != nullptr ? sqlite3_errmsg(checkpoint_db_)
                                     : sqlite3_errstr(open_status));
  }
  sqlite3_extended_result_codes(checkpoint_db_, 1);
  // The checkpoint syncs the database as the writer's settings say. One read opens the WAL
  // on this connection (a checkpoint needs it open); sqlite3_exec finalizes the statement, so
  // no read transaction stays open: a reader's snapshot would keep the WAL from starting over.
  const char* setup = synchronous_full
                          ? "PRAGMA synchronous=FULL; SELECT count(*) FROM sqlite_schema"
                          : "PRAGMA synchronous=NORMAL; SELECT count(*) FROM sqlite_schema";
  if (sqlite3_exec(checkpoint_db_, setup, nullptr, nullptr, nullptr) != SQLITE_OK) {
    failed(sqlite3_errmsg(checkpoint_db_));
  }
  // Replaces SQLite's auto-checkpoint (wal_autocheckpoint is a WAL hook too).
  sqlite3_wal_hook(db_, &SqliteJobStore::on_wal_commit, this);
}

bool SqliteJobStore::start_checkpoint_thread() noexcept {
  try {
    checkpointer_ = std::thread([this] { checkpointer_main(); });
    return true;
  } catch (const std::system_error&) {
    return false;
  }
}

void SqliteJobStore::stop_checkpointer() noexcept {
  if (db_ != nullptr) sqlite3_wal_hook(db_, nullptr, nullptr);
  if (checkpointer_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(checkpoint_mutex_);
      checkpoint_stopping_ = true;
    }
    checkpoint_wakeup_.notify_one();
    // A pass under way stops at its next page (SQLITE_INTERRUPT): the writer's close
    // checkpoints everything anyway.
    sqlite3_interrupt(checkpoint_db_);
    checkpointer_.join();
  }
  sqlite3_close_v2(checkpoint_db_);
  checkpoint_db_ = nullptr;
}

void SqliteJobStore::checkpointer_main() noexcept {
  pthread_setname_np(pthread_self(), "squall-wal");  // Seen in top -H, ps -L, perf.
  squall::detail::schedule_as_background();  // A pass's copy waits for the loop, not the reverse.
  std::unique_lock<std::mutex> lock(checkpoint_mutex_);
  for (;;) {
    checkpoint_wakeup_.wait(lock, [this] { return checkpoint_wanted_ || checkpoint_stopping_; });
    if (checkpoint_stopping_) return;
    checkpoint_wanted_ = false;
    checkpoint_running_ = true;
    const int copied_before = wal_copied_;
    const int frames_at_wake = wal_frames_;
    lock.unlock();

    checkpoint_counts_.checkpoints_started.fetch_add(1, std::memory_order_relaxed);
    int wal_pages = -1;
    int copied = -1;
    // PASSIVE: copies what no reader still needs, beside the writer, waiting for no lock.
    const int status = sqlite3_wal_checkpoint_v2(checkpoint_db_, "main", SQLITE_CHECKPOINT_PASSIVE,
                                                 &wal_pages, &copied);
    std::string error = status == SQLITE_OK ? std::string() : sqlite3_errmsg(checkpoint_db_);
    int sync_status = SQLITE_OK;
    if (status == SQLITE_OK && copied > copied_before) sync_status = sync_database();
    if (sync_status != SQLITE_OK) {
      error =
          std::string("fdatasync of the database after copying: ") + sqlite3_errstr(sync_status);
    }

    lock.lock();
    checkpoint_running_ = false;
    if (status == SQLITE_OK && sync_status == SQLITE_OK && wal_pages >= 0 && copied >= 0) {
      checkpoint_counts_.checkpoints.fetch_add(1, std::memory_order_relaxed);
      const int pages = pages_newly_copied(copied, copied_before);
      checkpoint_counts_.pages.fetch_add(static_cast<std::uint64_t>(pages),
                                         std::memory_order_relaxed);
      wal_copied_ = copied;
      tail_copied_ = false;
      // Progress: run again as soon as a commit finds more than the tail left. None (a reader
      // holds the rest): not before the WAL has grown by a threshold again.
      checkpoint_next_wake_ = pages > 0 ? 0 : wal_pages + sqlite_wal_checkpoint_pages;
      if (checkpoint_failing_) {
        checkpoint_failing_ = false;
        lock.unlock();
        spdlog::info("job store {}: the WAL checkpoint thread checkpoints again", path_);
        lock.lock();
      }
    } else if ((status & 0xff) == SQLITE_BUSY) {
      // The writer is checkpointing (a commit past the bound): the next commit asks again.
    } else if ((status & 0xff) == SQLITE_INTERRUPT && checkpoint_stopping_) {
      return;
    } else {
      checkpoint_counts_.failures.fetch_add(1, std::memory_order_relaxed);
      checkpoint_next_wake_ = frames_at_wake + sqlite_wal_checkpoint_pages;
      if (!checkpoint_failing_) {
        checkpoint_failing_ = true;
        lock.unlock();
        spdlog::warn(
            "job store {}: WAL checkpoint (PASSIVE, on the checkpoint thread) failed: {}; tried "
            "again after {} more WAL pages, and commits checkpoint for themselves once the WAL "
            "has {} pages",
            path_, error, sqlite_wal_checkpoint_pages, sqlite_wal_bound_pages);
        lock.lock();
      }
    }
  }
}

int SqliteJobStore::sync_database() noexcept {
  // SQLite syncs the database at the end of a checkpoint only when it reached the end of the
  // WAL (the WAL may start over only then), which a pass beside a busy writer never does: the
  // pages it wrote would all be synced by the commit that copies the tail. Synced here, that
  // commit syncs only its own few. Through SQLite's own file: closing another descriptor of
  // the file would drop the process's POSIX locks on it.
  sqlite3_file* file = nullptr;
  const int status = sqlite3_file_control(checkpoint_db_, "main", SQLITE_FCNTL_FILE_POINTER, &file);
  if (status != SQLITE_OK) return status;
  if (file == nullptr || file->pMethods == nullptr) return SQLITE_OK;  // Not open: nothing to sync.
  return file->pMethods->xSync(file, SQLITE_SYNC_NORMAL);
}

int SqliteJobStore::on_wal_commit(void* store, sqlite3*, const char* database,
                                  int frames) noexcept {
  if (database != nullptr && std::strcmp(database, "main") == 0) {
    static_cast<SqliteJobStore*>(store)->after_commit(frames);
  }
  // The commit is done whatever happens here: an error would only make it look failed.
  return SQLITE_OK;
}

void SqliteJobStore::after_commit(int frames) noexcept {
  enum class Action { none, tail, bound, own };
  Action action = Action::none;
  int copied_before = 0;
  bool thread_refused = false;
  {
    std::lock_guard<std::mutex> lock(checkpoint_mutex_);
    if (frames < wal_frames_) {
      // This commit began the WAL again from its start: nothing of it is copied yet.
      checkpoint_counts_.wal_restarts.fetch_add(1, std::memory_order_relaxed);
      wal_copied_ = 0;
      checkpoint_next_wake_ = sqlite_wal_checkpoint_pages;
      tail_copied_ = false;
    }
    wal_frames_ = frames;
    // A count the thread reported from before the WAL started over.
    if (wal_copied_ > frames) wal_copied_ = 0;
    copied_before = wal_copied_;
    const int uncopied = frames - wal_copied_;
    if (frames >= sqlite_wal_bound_pages) {
      action = Action::bound;
    } else if (frames >= sqlite_wal_checkpoint_pages && !checkpoint_running_ &&
               !checkpoint_wanted_) {
      if (checkpoint_thread_refused_) {
        // No thread to be had: this commit copies the WAL, as SQLite's auto-checkpoint did.
        action = Action::own;
      } else if (wal_copied_ > 0 && uncopied > 0 && uncopied <= sqlite_wal_tail_pages &&
                 !tail_copied_) {
        // Under a steady stream of commits the thread never copies the last frames (the
        // writer appends while it copies); SQLite restarts the WAL only at a write that
        // begins with every frame copied. These few, copied now, let the next one do it.
        action = Action::tail;
        tail_copied_ = true;
      } else if (frames >= checkpoint_next_wake_ && uncopied > sqlite_wal_tail_pages) {
        checkpoint_wanted_ = true;
        if (checkpointer_.joinable()) {
          checkpoint_wakeup_.notify_one();
        } else if (!start_checkpoint_thread()) {
          checkpoint_wanted_ = false;
          checkpoint_thread_refused_ = true;
          thread_refused = true;
          action = Action::own;
        }
      }
    }
  }
  if (thread_refused) {
    spdlog::warn(
        "job store {}: the system refused a thread for WAL checkpoints; commits checkpoint the "
        "WAL themselves from {} pages",
        path_, sqlite_wal_checkpoint_pages);
  }
  if (action != Action::none) commit_checkpoint(frames, copied_before, action == Action::bound);
}

void SqliteJobStore::commit_checkpoint(int frames, int copied_before, bool over_bound) noexcept {
  int wal_pages = -1;
  int copied = -1;
  const int status =
      sqlite3_wal_checkpoint_v2(db_, "main", SQLITE_CHECKPOINT_PASSIVE, &wal_pages, &copied);
  if (status == SQLITE_OK && wal_pages >= 0 && copied >= 0) {
    checkpoint_counts_.commit_checkpoints.fetch_add(1, std::memory_order_relaxed);
    if (over_bound) {
      checkpoint_counts_.commit_checkpoints_over_bound.fetch_add(1, std::memory_order_relaxed);
    }
    const int pages = pages_newly_copied(copied, copied_before);
    checkpoint_counts_.commit_pages.fetch_add(static_cast<std::uint64_t>(pages),
                                              std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(checkpoint_mutex_);
      wal_copied_ = copied;
    }
    if (commit_checkpoint_failing_) {
      commit_checkpoint_failing_ = false;
      spdlog::info("job store {}: commits checkpoint the WAL again", path_);
    }
  } else if ((status & 0xff) == SQLITE_BUSY) {
    // The checkpoint thread is in a pass: it copies these pages.
  } else {
    checkpoint_counts_.failures.fetch_add(1, std::memory_order_relaxed);
    if (!commit_checkpoint_failing_) {
      commit_checkpoint_failing_ = true;
      spdlog::warn(
          "job store {}: WAL checkpoint after a commit ({} pages in the WAL) failed: {}; the "
          "commit itself is stored, the next commit tries again",
          path_, frames, sqlite3_errmsg(db_));
    }
  }
}

CheckpointStats SqliteJobStore::checkpoint_stats() const noexcept {
  CheckpointStats stats;
  const auto& counts = checkpoint_counts_;
  stats.checkpoints = counts.checkpoints.load(std::memory_order_relaxed);
  stats.checkpoints_started = counts.checkpoints_started.load(std::memory_order_relaxed);
  stats.pages = counts.pages.load(std::memory_order_relaxed);
  stats.commit_checkpoints = counts.commit_checkpoints.load(std::memory_order_relaxed);
  stats.commit_checkpoints_over_bound =
      counts.commit_checkpoints_over_bound.load(std::memory_order_relaxed);
  stats.commit_pages = counts.commit_pages.load(std::memory_order_relaxed);
  stats.wal_restarts = counts.wal_restarts.load(std::memory_order_relaxed);
  stats.failures = counts.failures.load(std::memory_order_relaxed);
  return stats;
}

std::int64_t SqliteJobStore::pragma_int(const char* pragma, const char* operation) {
  Statement statement;
  prepare(statement, pragma, operation);
  StatementUse use(statement);
  return step(use.get(), operation) ? sqlite3_column_int64(use.get(), 0) : 0;
}

void SqliteJobStore::check_owner_and_version(int version) {
  const auto application_id =
      static_cast<std::int32_t>(pragma_int("PRAGMA application_id", "read application_id"));
  std::vector<std::string> tables;
  {
    Statement list;
    prepare(list,
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' "
            "ESCAPE '\\' ORDER BY name",
            "list tables");
    StatementUse use(list);
    while (step(use.get(), "list tables")) tables.push_back(column_string(use.get(), 0));
  }
  auto refuse = [this](const std::string& why) {
    throw std::runtime_error("job store " + path_ + ": " + why +
                             "; refusing to use it (nothing was written to it)");
  };
  std::string table_list;
  for (const std::string& table : tables) table_list += (table_list.empty() ? "" : ", ") + table;
  if (application_id == sqlite_application_id) {
    if (version > sqlite_schema_version) {
      refuse("schema version " + std::to_string(version) + " is newer than this squall supports (" +
             std::to_string(sqlite_schema_version) + "): written by a later squall");
    }
    return;
  }
  if (application_id != 0) {
    char hex[16];
    std::snprintf(hex, sizeof hex, "0x%08x", static_cast<unsigned>(application_id));
    refuse(std::string("the file belongs to another program (application_id ") + hex + ")");
  }
  // No application id: a new, empty file, or a store of schema version 1 (which set none).
  if (version == 0) {
    if (!tables.empty()) {
      refuse("the file belongs to another program (it has tables " + table_list +
             " and no squall schema version)");
    }
    return;
  }
  if (version > sqlite_schema_version || (version == 1 && table_list != "jobs")) {
    refuse("schema version " + std::to_string(version) + " is newer than this squall supports (" +
           std::to_string(sqlite_schema_version) + "), or the file belongs to another program " +
           "(tables: " + (table_list.empty() ? "none" : table_list) + ")");
  }
}

void SqliteJobStore::migrate(int from_version) {
  // In one transaction, so two processes creating the store at once cannot half-create it,
  // and a failed step leaves the previous version intact.
  exec("BEGIN IMMEDIATE", "migrate the schema");
  try {
    // Another process may have migrated the file between the check and the lock.
    const std::int64_t current = pragma_int("PRAGMA user_version", "migrate the schema");
    for (std::size_t step = current < 0 ? 0 : static_cast<std::size_t>(current);
         step < std::size(migrations); ++step) {
      const auto migration = migrations[step];
      (this->*migration)();
    }
    exec(("PRAGMA user_version=" + std::to_string(sqlite_schema_version)).c_str(),
         "migrate the schema");
    exec("COMMIT", "migrate the schema");
  } catch (...) {
    rollback();
    throw std::runtime_error("job store " + path_ + ": migrating schema version " +
                             std::to_string(from_version) + " to " +
                             std::to_string(sqlite_schema_version) + " failed: " + [] {
                               try {
                                 throw;
                               } catch (const std::exception& error) {
                                 return std::string(error.what());
                               } catch (...) {
                                 return std::string("an unknown error");
                               }
                             }());
  }
}

void SqliteJobStore::migrate_to_1() {
  exec(schema_v1_sql, "create schema version 1");
}

void SqliteJobStore::migrate_to_3() {
  exec(schema_v3_sql, "migrate to schema version 3");
}

void SqliteJobStore::migrate_to_4() {
  exec(schema_v4_sql, "migrate to schema version 4");
}

void SqliteJobStore::migrate_to_5() {
  const char* operation = "migrate to schema version 5 (the state CHECK constraint)";
  const std::int64_t schema_version = pragma_int("PRAGMA schema_version", operation);
  // Whatever happens, the schema is writable only for these few statements (and the whole
  // migration is one transaction: a failure rolls the text back too).
  exec("PRAGMA writable_schema=ON", operation);
  int written = 0;
  try {
    {
      Statement update;
      prepare(update,
              "UPDATE sqlite_schema SET sql = replace(sql, ?1, ?2) WHERE type = 'table' AND "
              "name = 'jobs' AND instr(sql, ?1) > 0",
              operation);
      StatementUse use(update);
      bind_text(use.get(), 1, state_check_v1, operation);
      bind_text(use.get(), 2, state_check_v5, operation);
      step(use.get(), operation);
      written = sqlite3_changes(db_);
    }
    if (written == 0) {
      // Already written this way (a file taken back to an earlier version by hand).
      Statement already;
      prepare(already,
              "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'jobs' AND "
              "instr(sql, ?1) > 0",
              operation);
      StatementUse use(already);
      bind_text(use.get(), 1, state_check_v5, operation);
      if (step(use.get(), operation)) written = sqlite3_column_int(use.get(), 0);
    }
    // Every connection to the file (this one included) reads the schema again.
    exec(("PRAGMA schema_version=" + std::to_string(schema_version + 1)).c_str(), operation);
  } catch (...) {
    sqlite3_exec(db_, "PRAGMA writable_schema=OFF", nullptr, nullptr, nullptr);
    throw;
  }
  exec("PRAGMA writable_schema=OFF", operation);
  if (written != 1) {
    throw std::runtime_error(std::string("the jobs table has no constraint ") + state_check_v1 +
                             " (as squall created it) to rewrite");
  }
}

void SqliteJobStore::migrate_to_2() {
  exec(schema_v2_sql, "migrate to schema version 2");
  exec(("PRAGMA application_id=" + std::to_string(sqlite_application_id)).c_str(),
       "migrate to schema version 2: set application_id");
  // Digests of the jobs stored before: their payloads are all still there.
  std::vector<std::pair<std::int64_t, std::string>> digests;
  {
    Statement select;
    prepare(select, "SELECT seq, payload FROM jobs", "migrate to schema version 2");
    StatementUse use(select);
    while (step(use.get(), "migrate to schema version 2")) {
      digests.emplace_back(sqlite3_column_int64(use.get(), 0),
                           payload_digest(column_string(use.get(), 1)));
    }
  }
  Statement update;
  prepare(update, "UPDATE jobs SET payload_digest = ?2 WHERE seq = ?1",
          "migrate to schema version 2");
  for (const auto& [seq, digest] : digests) {
    StatementUse use(update);
    bind_int(use.get(), 1, seq, "migrate to schema version 2");
    if (sqlite3_bind_blob64(use.get(), 2, digest.data(), digest.size(), SQLITE_STATIC) !=
        SQLITE_OK) {
      fail("migrate to schema version 2");
    }
    step(use.get(), "migrate to schema version 2");
  }
}

void SqliteJobStore::fail(const char* operation) const {
  std::string message = "job store " + path_ + ": " + operation + ": ";
  const int code = sqlite3_extended_errcode(db_);
  if ((code & 0xff) == SQLITE_NOTADB) {
    message += "not a SQLite database (";
    message += sqlite3_errmsg(db_);
    message += ")";
  } else {
    message += sqlite3_errmsg(db_);
  }
  throw std::runtime_error(message);
}

void SqliteJobStore::prepare(Statement& statement, const char* sql, const char* operation) {
  if (sqlite3_prepare_v3(db_, sql, -1, SQLITE_PREPARE_PERSISTENT, statement.out(), nullptr) !=
      SQLITE_OK) {
    fail(operation);
  }
}

void SqliteJobStore::exec(const char* sql, const char* operation) {
  if (sqlite3_exec(db_, sql, nullptr, nullptr, nullptr) != SQLITE_OK) fail(operation);
}

bool SqliteJobStore::step(sqlite3_stmt* stmt, const char* operation) {
  const int status = sqlite3_step(stmt);
  if (status == SQLITE_ROW) return true;
  if (status == SQLITE_DONE) return false;
  fail(operation);
}

void SqliteJobStore::bind_text(sqlite3_stmt* stmt, int index, std::string_view text,
                               const char* operation) {
  // SQLITE_STATIC: the caller's string outlives the step; StatementUse clears the binding.
  // A null data() would bind NULL, so an empty view binds "" explicitly.
  const char* data = text.empty() ? "" : text.data();
  if (sqlite3_bind_text64(stmt, index, data, text.size(), SQLITE_STATIC, SQLITE_UTF8) !=
      SQLITE_OK) {
    fail(operation);
  }
}

void SqliteJobStore::bind_int(sqlite3_stmt* stmt, int index, std::int64_t value,
                              const char* operation) {
  if (sqlite3_bind_int64(stmt, index, value) != SQLITE_OK) fail(operation);
}

Job SqliteJobStore::read_job(sqlite3_stmt* stmt, const char* operation) const {
  Job job;
  job.id = column_string(stmt, 0);
  job.kind = column_string(stmt, 1);
  const std::string state = column_string(stmt, 2);
  const std::optional<JobState> parsed = parse_job_state(state);
  if (!parsed) {
    throw std::runtime_error("job store " + path_ + ": " + operation + ": job " + job.id +
                             " has an unknown state '" + state + "'");
  }
  job.state = *parsed;
  job.payload = column_string(stmt, 3);
  job.idempotency_key = column_string(stmt, 4);
  job.attempts = sqlite3_column_int(stmt, 5);
  job.last_error = column_string(stmt, 6);
  job.created_ms = sqlite3_column_int64(stmt, 7);
  job.updated_ms = sqlite3_column_int64(stmt, 8);
  job.run_after_ms = sqlite3_column_int64(stmt, 9);
  job.lease_until_ms = sqlite3_column_int64(stmt, 10);
  job.finished_ms = sqlite3_column_int64(stmt, 11);
  job.payload_digest = column_string(stmt, 12);
  job.owner = column_string(stmt, 13);
  const int webhook = sqlite3_column_int(stmt, 14);
  if (webhook < 0 || webhook > static_cast<int>(WebhookState::given_up)) {
    throw std::runtime_error("job store " + path_ + ": " + operation + ": job " + job.id +
                             " has an unknown webhook_state " + std::to_string(webhook));
  }
  job.webhook = static_cast<WebhookState>(webhook);
  job.webhook_attempts = sqlite3_column_int(stmt, 15);
  job.webhook_due_ms = sqlite3_column_int64(stmt, 16);
  return job;
}

std::optional<Job> SqliteJobStore::find(const Statement& statement, std::string_view key,
                                        const char* operation, const std::string* owner) {
  StatementUse use(statement);
  bind_text(use.get(), 1, key, operation);
  if (owner != nullptr) bind_text(use.get(), 2, *owner, operation);
  if (!step(use.get(), operation)) return std::nullopt;
  return read_job(use.get(), operation);
}

bool SqliteJobStore::run_update(const Statement& statement, const char* operation) {
  step(statement.get(), operation);
  return sqlite3_changes(db_) > 0;
}

void SqliteJobStore::rollback() noexcept {
  // A failed COMMIT or an I/O error may already have ended the transaction.
  if (sqlite3_get_autocommit(db_)) return;
  if (rollback_.get() != nullptr) {
    sqlite3_step(rollback_.get());
    sqlite3_reset(rollback_.get());
  } else {
    sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }
}

SqliteJobStore::Transaction::Transaction(SqliteJobStore& store, const char* operation)
    : store_(store), operation_(operation) {
  if (store_.transaction_depth_ == 0) {
    StatementUse use(store_.begin_);
    store_.step(use.get(), operation_);
    store_.transaction_doomed_ = false;
  }
  ++store_.transaction_depth_;
}

SqliteJobStore::Transaction::~Transaction() {
  --store_.transaction_depth_;
  if (!committed_) store_.transaction_doomed_ = true;
  if (store_.transaction_depth_ == 0 && store_.transaction_doomed_) store_.rollback();
}

void SqliteJobStore::Transaction::commit() {
  if (store_.transaction_depth_ > 1) {
    committed_ = true;  // The outermost scope commits.
    return;
  }
  if (store_.transaction_doomed_) {
    throw std::runtime_error("job store " + store_.path_ + ": " + operation_ +
                             ": an operation inside the transaction failed; rolled back");
  }
  StatementUse use(store_.commit_);
  store_.step(use.get(), operation_);
  committed_ = true;
}

std::vector<Inserted> SqliteJobStore::insert_batch(std::vector<NewJob> jobs, std::int64_t now_ms) {
  std::vector<Inserted> results;
  if (jobs.empty()) return results;
  results.reserve(jobs.size());
  // One getrandom call for the whole batch instead of one per job.
  std::vector<unsigned char> random(jobs.size() * kJobIdRandomBytes);
  fill_random(random.data(), random.size());

  Transaction transaction(*this, "insert");
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    NewJob& new_job = jobs[i];
    Job job;
    job.id = job_id(now_ms, random.data() + kJobIdRandomBytes * i);
    bool created = false;
    {
      StatementUse use(insert_);
      bind_text(use.get(), 1, job.id, "insert");
      bind_text(use.get(), 2, new_job.kind, "insert");
      const char* payload = new_job.payload.empty() ? "" : new_job.payload.data();
      if (sqlite3_bind_blob64(use.get(), 3, payload, new_job.payload.size(), SQLITE_STATIC) !=
          SQLITE_OK) {
        fail("insert");
      }
      bind_text(use.get(), 4, new_job.idempotency_key, "insert");
      bind_int(use.get(), 5, now_ms, "insert");
      // Only a repeated Idempotency-Key compares digests: a keyless job needs none (a SHA-256
      // of the payload was a sixth of the store thread's work per insert).
      if (!new_job.idempotency_key.empty()) job.payload_digest = payload_digest(new_job.payload);
      if (sqlite3_bind_blob64(use.get(), 6, job.payload_digest.data(), job.payload_digest.size(),
                              SQLITE_STATIC) != SQLITE_OK) {
        fail("insert");
      }
      bind_text(use.get(), 7, new_job.owner, "insert");
      // DO NOTHING on a known key: no change means the key exists (the unique id cannot be
      // the cause: that conflict is not the target and would raise an error).
      created = run_update(insert_, "insert");
    }
    if (created) {
      // The statement's bindings are cleared: the strings can move.
      job.kind = std::move(new_job.kind);
      job.state = JobState::queued;
      job.payload = std::move(new_job.payload);
      job.idempotency_key = std::move(new_job.idempotency_key);
      job.owner = std::move(new_job.owner);
      job.created_ms = job.updated_ms = job.run_after_ms = now_ms;
      results.push_back(Inserted{std::move(job), true});
    } else {
      // Same transaction, so a key first used earlier in this batch is found too.
      std::optional<Job> existing = find(get_by_key_, new_job.idempotency_key,
                                         "insert: read the existing job", &new_job.owner);
      if (!existing) {
        throw std::runtime_error("job store " + path_ + ": insert: idempotency key '" +
                                 new_job.idempotency_key + "' conflicted but was not found");
      }
      results.push_back(Inserted{std::move(*existing), false});
    }
  }
  transaction.commit();
  return results;
}

std::optional<Job> SqliteJobStore::get(std::string_view id) {
  return find(get_by_id_, id, "get");
}

std::vector<Job> SqliteJobStore::claim(std::size_t max, std::int64_t now_ms,
                                       std::int64_t lease_ms) {
  return take_due(claim_, "claim", max, now_ms, lease_ms);
}

std::vector<Job> SqliteJobStore::hold(std::size_t max, std::int64_t now_ms, std::int64_t lease_ms) {
  return take_due(hold_, "hold", max, now_ms, lease_ms);
}

bool SqliteJobStore::start(std::string_view id, std::int64_t now_ms, std::int64_t lease_ms) {
  if (lease_ms <= 0) throw std::invalid_argument("job store start: lease_ms must be positive");
  StatementUse use(start_);
  bind_text(use.get(), 1, id, "start");
  bind_int(use.get(), 2, now_ms, "start");
  bind_int(use.get(), 3, now_ms + lease_ms, "start");
  return run_update(start_, "start");
}

std::vector<Job> SqliteJobStore::take_due(const Statement& statement, const char* operation,
                                          std::size_t max, std::int64_t now_ms,
                                          std::int64_t lease_ms) {
  if (lease_ms <= 0) {
    throw std::invalid_argument(std::string("job store ") + operation +
                                ": lease_ms must be positive");
  }
  std::vector<Job> jobs;
  if (max == 0) return jobs;
  const auto limit = static_cast<std::int64_t>(std::min<std::size_t>(
      max, static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max())));

  std::vector<std::pair<std::int64_t, Job>> claimed;  // (seq, job): RETURNING has no order.
  Transaction transaction(*this, operation);
  {
    StatementUse use(statement);
    bind_int(use.get(), 1, now_ms, operation);
    bind_int(use.get(), 2, now_ms + lease_ms, operation);
    bind_int(use.get(), 3, limit, operation);
    while (step(use.get(), operation)) {
      claimed.emplace_back(sqlite3_column_int64(use.get(), claim_seq_column),
                           read_job(use.get(), operation));
    }
  }
  transaction.commit();

  std::sort(claimed.begin(), claimed.end(), [](const auto& a, const auto& b) {
    return std::tie(a.second.run_after_ms, a.second.created_ms, a.first) <
           std::tie(b.second.run_after_ms, b.second.created_ms, b.first);
  });
  jobs.reserve(claimed.size());
  for (auto& entry : claimed) jobs.push_back(std::move(entry.second));
  return jobs;
}

bool SqliteJobStore::mark_sent(std::string_view id, std::int64_t now_ms) {
  StatementUse use(mark_sent_);
  bind_text(use.get(), 1, id, "mark_sent");
  bind_int(use.get(), 2, now_ms, "mark_sent");
  bind_int(use.get(), 3, webhooks_ ? 1 : 0, "mark_sent");
  return run_update(mark_sent_, "mark_sent");
}

bool SqliteJobStore::mark_retry(std::string_view id, std::string_view error,
                                std::int64_t run_after_ms, std::int64_t now_ms) {
  StatementUse use(mark_retry_);
  bind_text(use.get(), 1, id, "mark_retry");
  bind_text(use.get(), 2, error, "mark_retry");
  bind_int(use.get(), 3, run_after_ms, "mark_retry");
  bind_int(use.get(), 4, now_ms, "mark_retry");
  return run_update(mark_retry_, "mark_retry");
}

bool SqliteJobStore::mark_failed(std::string_view id, std::string_view error, std::int64_t now_ms) {
  StatementUse use(mark_failed_);
  bind_text(use.get(), 1, id, "mark_failed");
  bind_int(use.get(), 2, now_ms, "mark_failed");
  bind_int(use.get(), 3, webhooks_ ? 1 : 0, "mark_failed");
  bind_text(use.get(), 4, error, "mark_failed");
  return run_update(mark_failed_, "mark_failed");
}

bool SqliteJobStore::release(std::string_view id, std::int64_t now_ms) {
  StatementUse use(release_);
  bind_text(use.get(), 1, id, "release");
  bind_int(use.get(), 2, now_ms, "release");
  return run_update(release_, "release");
}

std::int64_t SqliteJobStore::count_pending() {
  StatementUse use(count_pending_);
  if (!step(use.get(), "count_pending")) return 0;
  return sqlite3_column_int64(use.get(), 0);
}

std::vector<OwnerUsage> SqliteJobStore::pending_by_owner() {
  std::vector<OwnerUsage> usage;
  StatementUse use(pending_by_owner_);
  while (step(use.get(), "pending_by_owner")) {
    usage.push_back(OwnerUsage{column_string(use.get(), 0), sqlite3_column_int64(use.get(), 1),
                               sqlite3_column_int64(use.get(), 2)});
  }
  return usage;
}

StoreStats SqliteJobStore::stats(std::int64_t /*now_ms*/) {
  StoreStats result;
  // Both reads in one snapshot, unless a caller's transaction already provides one.
  const bool own_snapshot = transaction_depth_ == 0;
  if (own_snapshot) {
    StatementUse use(begin_read_);
    step(use.get(), "stats");
  }
  try {
    {
      StatementUse use(count_by_state_);
      while (step(use.get(), "stats")) {
        const std::optional<JobState> state = parse_job_state(column_string(use.get(), 0));
        if (state)
          result.by_state[static_cast<std::size_t>(*state)] = sqlite3_column_int64(use.get(), 1);
      }
    }
    {
      StatementUse use(oldest_queued_);
      if (step(use.get(), "stats")) result.oldest_queued_ms = sqlite3_column_int64(use.get(), 0);
    }
  } catch (...) {
    if (own_snapshot) rollback();
    throw;
  }
  if (own_snapshot) {
    StatementUse use(commit_);
    step(use.get(), "stats");
  }
  return result;
}

void SqliteJobStore::transaction(const std::function<void()>& body) {
  Transaction transaction(*this, "transaction");
  body();
  transaction.commit();
}

std::size_t SqliteJobStore::purge_finished(std::int64_t finished_before_ms, std::size_t max_jobs) {
  if (max_jobs == 0) return 0;
  Transaction transaction(*this, "purge");
  std::size_t deleted = 0;
  {
    StatementUse use(purge_);
    bind_int(use.get(), 1, finished_before_ms, "purge");
    bind_int(use.get(), 2,
             static_cast<std::int64_t>(std::min<std::size_t>(
                 max_jobs, static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max()))),
             "purge");
    step(use.get(), "purge");
    deleted = static_cast<std::size_t>(sqlite3_changes(db_));
  }
  transaction.commit();
  return deleted;
}

std::int64_t SqliteJobStore::compact(std::int64_t max_pages) {
  if (max_pages > 0) {
    exec(("PRAGMA incremental_vacuum(" + std::to_string(max_pages) + ")").c_str(), "compact");
  }
  return pragma_int("PRAGMA freelist_count", "compact");
}

std::size_t SqliteJobStore::expire_all_leases(std::int64_t now_ms) {
  Transaction transaction(*this, "expire_all_leases");
  std::size_t expired = 0;
  {
    StatementUse use(expire_leases_);
    bind_int(use.get(), 1, now_ms, "expire_all_leases");
    step(use.get(), "expire_all_leases");
    expired = static_cast<std::size_t>(sqlite3_changes(db_));
  }
  {
    StatementUse use(expire_holds_);
    bind_int(use.get(), 1, now_ms, "expire_all_leases");
    step(use.get(), "expire_all_leases");
  }
  transaction.commit();
  return expired;
}

void SqliteJobStore::probe_write(std::int64_t now_ms) {
  Transaction transaction(*this, "probe_write");
  {
    StatementUse use(probe_);
    bind_int(use.get(), 1, now_ms, "probe_write");
    step(use.get(), "probe_write");
  }
  transaction.commit();
}

std::vector<Job> SqliteJobStore::claim_webhooks(std::size_t max, std::int64_t now_ms,
                                                std::int64_t lease_ms) {
  if (lease_ms <= 0) {
    throw std::invalid_argument("job store claim_webhooks: lease_ms must be positive");
  }
  std::vector<Job> jobs;
  if (max == 0) return jobs;
  const auto limit = static_cast<std::int64_t>(std::min<std::size_t>(
      max, static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max())));
  std::vector<std::pair<std::int64_t, Job>> claimed;  // (seq, job): RETURNING has no order.
  Transaction transaction(*this, "claim_webhooks");
  {
    StatementUse use(claim_webhooks_);
    bind_int(use.get(), 1, now_ms, "claim_webhooks");
    bind_int(use.get(), 2, now_ms + lease_ms, "claim_webhooks");
    bind_int(use.get(), 3, limit, "claim_webhooks");
    while (step(use.get(), "claim_webhooks")) {
      claimed.emplace_back(sqlite3_column_int64(use.get(), claim_seq_column),
                           read_job(use.get(), "claim_webhooks"));
    }
  }
  transaction.commit();
  std::sort(claimed.begin(), claimed.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  jobs.reserve(claimed.size());
  for (auto& entry : claimed) jobs.push_back(std::move(entry.second));
  return jobs;
}

bool SqliteJobStore::mark_webhook(std::string_view id, WebhookState state, std::int64_t due_ms,
                                  std::int64_t /*now_ms*/) {
  if (state == WebhookState::none) {
    throw std::invalid_argument("job store mark_webhook: the state must not be none");
  }
  StatementUse use(mark_webhook_);
  bind_text(use.get(), 1, id, "mark_webhook");
  bind_int(use.get(), 2, static_cast<int>(state), "mark_webhook");
  bind_int(use.get(), 3, state == WebhookState::owed ? due_ms : 0, "mark_webhook");
  return run_update(mark_webhook_, "mark_webhook");
}

bool SqliteJobStore::release_webhook(std::string_view id, std::int64_t now_ms) {
  StatementUse use(release_webhook_);
  bind_text(use.get(), 1, id, "release_webhook");
  bind_int(use.get(), 2, now_ms, "release_webhook");
  return run_update(release_webhook_, "release_webhook");
}

std::int64_t SqliteJobStore::count_webhooks_owed() {
  StatementUse use(count_webhooks_);
  if (!step(use.get(), "count_webhooks_owed")) return 0;
  return sqlite3_column_int64(use.get(), 0);
}

}  // namespace

std::string_view to_string(JobState state) noexcept {
  const auto index = static_cast<std::size_t>(state);
  return index < state_names.size() ? state_names[index] : std::string_view("unknown");
}

std::optional<JobState> parse_job_state(std::string_view text) noexcept {
  for (std::size_t i = 0; i < state_names.size(); ++i) {
    if (state_names[i] == text) return static_cast<JobState>(i);
  }
  return std::nullopt;
}

std::int64_t unix_now_ms() noexcept {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string new_job_id() {
  return new_job_id(unix_now_ms());
}

std::string new_job_id(std::int64_t now_ms) {
  unsigned char random[kJobIdRandomBytes];
  fill_random(random, sizeof random);
  return job_id(now_ms, random);
}

std::unique_ptr<JobStore> open_sqlite_store(const std::string& path, bool synchronous_full) {
  return std::make_unique<SqliteJobStore>(path, synchronous_full);
}

std::string payload_digest(std::string_view payload) {
  // OpenSSL 3 looks EVP_sha256() up in its provider tables on every EVP_Digest, and EVP_Digest
  // allocates a context each time: the fetched implementation is kept for the process, a
  // context per thread (the store thread digests every insert).
  static EVP_MD* const sha256 = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  struct ContextDeleter {
    void operator()(EVP_MD_CTX* context) const noexcept { EVP_MD_CTX_free(context); }
  };
  thread_local const std::unique_ptr<EVP_MD_CTX, ContextDeleter> context(EVP_MD_CTX_new());
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  if (sha256 == nullptr || context == nullptr ||
      EVP_DigestInit_ex2(context.get(), sha256, nullptr) != 1 ||
      EVP_DigestUpdate(context.get(), payload.data(), payload.size()) != 1 ||
      EVP_DigestFinal_ex(context.get(), digest, &size) != 1) {
    throw std::runtime_error("job store: SHA-256 of a payload failed");
  }
  return std::string(reinterpret_cast<const char*>(digest), size);
}

StoreLock StoreLock::try_acquire(const std::string& store_path, std::string& holder) {
  holder.clear();
  StoreLock lock;
  if (store_path.empty() || store_path == ":memory:" || store_path.starts_with("file:")) {
    lock.acquired_ = true;
    return lock;
  }
  const std::string path = store_path + ".lock";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    throw std::runtime_error("job store lock " + path + ": open: " + std::strerror(errno));
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int error = errno;
    char text[32] = {};
    const ssize_t got = ::pread(fd, text, sizeof text - 1, 0);
    if (got > 0) holder.assign(text, static_cast<std::size_t>(got));
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    ::close(fd);
    if (error != EWOULDBLOCK) {
      throw std::runtime_error("job store lock " + path + ": flock: " + std::strerror(error));
    }
    return lock;
  }
  // The pid, for the message of a process that finds the lock taken.
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) < 0) {
    // Only the message would lack the pid; the lock itself holds.
  }
  lock.fd_ = fd;
  lock.acquired_ = true;
  return lock;
}

StoreLock::StoreLock(StoreLock&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), acquired_(std::exchange(other.acquired_, false)) {}

StoreLock& StoreLock::operator=(StoreLock&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
    acquired_ = std::exchange(other.acquired_, false);
  }
  return *this;
}

StoreLock::~StoreLock() {
  if (fd_ >= 0) ::close(fd_);
}

}  // namespace squall::jobs

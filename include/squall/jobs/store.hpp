// The durable job store: one row per background job, claimed by a sender with a lease. An
// interface with two implementations: SQLite (open_sqlite_store, one node) and PostgreSQL
// (open_postgresql_store in pg_store.hpp, several nodes sharing one queue).
// Every call blocks on the disk: never call it on the loop thread (writes go through the
// StoreWorker).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace squall::jobs {

// A job's life: queued -> sending -> (sent | retrying -> sending ... | failed).
enum class JobState { queued, sending, retrying, sent, failed };
// The number of JobState values; StoreStats::by_state is indexed by the enum's value.
inline constexpr std::size_t job_state_count = 5;

// "queued", "sending", "retrying", "sent" or "failed": the text stored and shown in JSON.
std::string_view to_string(JobState state) noexcept;
// The state named by `text` (exactly as to_string spells it), or nullopt.
std::optional<JobState> parse_job_state(std::string_view text) noexcept;

// A finished job's webhook: none owed (webhooks off when it finished), owed (waiting for a
// delivery), delivered (a 2xx answer) or given up (after the last attempt).
enum class WebhookState { none = 0, owed = 1, delivered = 2, given_up = 3 };

// Milliseconds since the Unix epoch by the wall clock: the time base of every Job field.
std::int64_t unix_now_ms() noexcept;

// One stored job. Times are Unix epoch milliseconds; 0 means not set.
struct Job {
  std::string id;                     // 32 lowercase hex digits; see new_job_id().
  std::string kind;                   // What the runner does with it, e.g. "email".
  JobState state = JobState::queued;  // Where it is in its life.
  std::string payload;                // Opaque bytes for the runner (stored as a BLOB).
  std::string idempotency_key;        // The client's Idempotency-Key; empty = none.
  int attempts = 0;                   // Claims so far (a claim counts as an attempt).
  std::string last_error;             // The last failure's text; kept after a later success.
  std::int64_t created_ms = 0;        // When it was inserted.
  std::int64_t updated_ms = 0;        // Its last change.
  std::int64_t run_after_ms = 0;      // Not claimed before this time.
  std::int64_t lease_until_ms = 0;    // While sending: reclaimable after this time.
  std::int64_t finished_ms = 0;       // When it became sent or failed.
  // SHA-256 of the payload as inserted (32 bytes; see payload_digest()): kept when the payload
  // itself is deleted (a sent job), so a repeated Idempotency-Key can still be compared. Empty
  // for a job without an Idempotency-Key, which nothing can repeat (stores before schema 5 of
  // SQLite digested those too).
  std::string payload_digest;
  std::string owner;  // Who created it (an API token's name); "" = anonymous.
  // Webhooks (schema 4): set owed by mark_sent/mark_failed while webhooks are on.
  WebhookState webhook = WebhookState::none;  // See WebhookState.
  int webhook_attempts = 0;                   // Webhook claims so far.
  std::int64_t webhook_due_ms = 0;            // Owed: not claimed before this time.
};

// What a producer hands in; everything else is set by the store.
struct NewJob {
  NewJob() = default;
  // The owner is last and optional, so {kind, payload, key} still reads as before.
  NewJob(std::string kind_, std::string payload_, std::string idempotency_key_,
         std::string owner_ = {})
      : kind(std::move(kind_)),
        payload(std::move(payload_)),
        idempotency_key(std::move(idempotency_key_)),
        owner(std::move(owner_)) {}

  std::string kind;             // See Job::kind.
  std::string payload;          // See Job::payload.
  std::string idempotency_key;  // Empty = none; unique per owner.
  std::string owner;            // See Job::owner.
};

// The outcome of one NewJob. created=false: its idempotency key already existed, and `job`
// is that existing job, unchanged even when kind or payload differ (the caller compares them
// if it wants to refuse a reused key with another request, as Stripe and the IETF draft do).
struct Inserted {
  Job job;               // The stored job (new or existing).
  bool created = false;  // Whether this call created it.
};

// What one owner has waiting (queued, retrying or sending).
struct OwnerUsage {
  std::string owner;       // See Job::owner.
  std::int64_t jobs = 0;   // Waiting jobs.
  std::int64_t bytes = 0;  // Their payloads' bytes.
};

// Counts for metrics.
struct StoreStats {
  std::array<std::int64_t, job_state_count> by_state{};  // Jobs per JobState value.
  std::int64_t oldest_queued_ms = 0;  // created_ms of the oldest queued/retrying job; 0 if none.
};

// What a store did to keep its write-ahead log short (SQLite's WAL; zero for a store without
// one). Totals since the store was opened.
struct CheckpointStats {
  std::uint64_t checkpoints = 0;          // Checkpoints run by the store's checkpoint thread.
  std::uint64_t checkpoints_started = 0;  // Of those, begun (a close may cut the last short).
  std::uint64_t pages = 0;                // WAL pages they copied into the database.
  // Checkpoints run by the writing connection right after a commit, on the commit path: the
  // last few pages the checkpoint thread had not copied, so that the WAL starts over (see
  // sqlite_wal_tail_pages), or everything left once the WAL reached sqlite_wal_bound_pages.
  std::uint64_t commit_checkpoints = 0;
  std::uint64_t commit_checkpoints_over_bound = 0;  // Of those, the WAL had reached the bound.
  std::uint64_t commit_pages = 0;                   // WAL pages those copied.
  std::uint64_t wal_restarts = 0;  // Commits that began writing the WAL from its start again.
  std::uint64_t failures = 0;      // Checkpoints that failed (busy is not a failure); logged.
};

// A job table. Blocking; used by one thread at a time. Every failure throws
// std::runtime_error naming the store, the operation and the database's message.
class JobStore {
 public:
  virtual ~JobStore() = default;

  // Inserts every job in one transaction (all or nothing) with state queued and
  // run_after = now_ms; results are in input order. A key repeated by the same owner (within
  // the batch or before) yields the first job, created=false; keys of other owners never
  // collide. A created job's strings are moved from `jobs` into its result.
  virtual std::vector<Inserted> insert_batch(std::vector<NewJob> jobs, std::int64_t now_ms) = 0;
  // The job with this id, or nullopt.
  virtual std::optional<Job> get(std::string_view id) = 0;
  // In one transaction, takes up to `max` jobs that are due (queued or retrying with
  // run_after <= now and no hold, see hold()) or whose lease expired (sending with
  // lease_until < now), by run_after, then created, then insertion; each becomes sending with
  // attempts+1 and lease_until = now + lease_ms. Returned in that order.
  virtual std::vector<Job> claim(std::size_t max, std::int64_t now_ms, std::int64_t lease_ms) = 0;
  // Claiming ahead (a runner's prefetch): in one transaction, takes up to `max` jobs that
  // claim() would take, in claim()'s order, and holds each with lease_until = now + lease_ms
  // without starting it: a queued or retrying job keeps its state and attempts (it is still
  // waiting, and says so), a sending job whose lease expired becomes retrying (its attempt is
  // over, outcome unknown). A held job is taken by neither claim() nor hold() until its lease
  // ends. Returned in claim()'s order.
  virtual std::vector<Job> hold(std::size_t max, std::int64_t now_ms, std::int64_t lease_ms) = 0;
  // A held (or otherwise waiting) queued/retrying job's attempt begins: it becomes sending with
  // attempts+1 and lease_until = now + lease_ms. False if unknown or not queued/retrying (e.g.
  // its hold ended and another node claimed it).
  virtual bool start(std::string_view id, std::int64_t now_ms, std::int64_t lease_ms) = 0;
  // sending/queued/retrying/failed -> sent (a delivery is the truth, whoever reports it).
  // False if the id is unknown or the job was already sent.
  virtual bool mark_sent(std::string_view id, std::int64_t now_ms) = 0;
  // sending -> retrying, due at run_after_ms. False if unknown or not sending (a stale sender).
  virtual bool mark_retry(std::string_view id, std::string_view error, std::int64_t run_after_ms,
                          std::int64_t now_ms) = 0;
  // sending -> failed for good. False if unknown or not sending.
  virtual bool mark_failed(std::string_view id, std::string_view error, std::int64_t now_ms) = 0;
  // sending -> queued, attempts-1, lease cleared: a claimed job that was never started; or a
  // held queued/retrying job's hold ends (lease cleared, nothing else changes). False if
  // unknown, or neither sending nor held.
  virtual bool release(std::string_view id, std::int64_t now_ms) = 0;
  // Jobs queued, retrying or sending. Walks an index entry per pending job (about 60 ms per
  // million): poll it (e.g. with each claim), never per request.
  virtual std::int64_t count_pending() = 0;
  // Waiting jobs and their payload bytes per owner (owners with none are left out).
  virtual std::vector<OwnerUsage> pending_by_owner() = 0;
  // Jobs per state and the oldest waiting job. Walks an index entry per job, finished ones
  // included (about 0.2 s per million), stalling the StoreWorker's inserts meanwhile: call it
  // on a second store opened on the same file, off the loop (WAL readers never block the
  // writer), or rarely. now_ms is unused by SQLite.
  virtual StoreStats stats(std::int64_t now_ms) = 0;
  // Runs `body` in one transaction, so several calls share one commit (one fsync): e.g. a
  // runner's marks for many jobs. Calls inside join it; an exception escaping `body`, or
  // thrown by any call inside it, rolls all of it back. Nesting is allowed.
  virtual void transaction(const std::function<void()>& body) = 0;

  // Retention: deletes up to `max_jobs` finished jobs (sent or failed) that finished before
  // `finished_before_ms`, oldest first, with their Idempotency-Keys, in one transaction.
  // Returns how many were deleted; fewer than max_jobs means none is left to delete.
  virtual std::size_t purge_finished(std::int64_t finished_before_ms, std::size_t max_jobs) = 0;
  // Gives up to `max_pages` free pages back to the file system (incremental vacuum); returns
  // the free pages left. Bounded, so a store thread that runs it never stalls inserts long.
  virtual std::int64_t compact(std::int64_t max_pages) = 0;
  // Makes every sending job reclaimable at once (its lease ends now), and ends every hold:
  // call it only when no other process can be sending from this store (StoreLock says so).
  // Returns the number of sending jobs (the held ones were never started).
  virtual std::size_t expire_all_leases(std::int64_t now_ms) = 0;
  // Commits a small write, to learn whether the store accepts writes again (after a full
  // disk, a lock held too long, an I/O error). Throws as every other write does.
  virtual void probe_write(std::int64_t now_ms) = 0;

  // Webhooks. While `on`, mark_sent and mark_failed make the job's webhook owed (due at once,
  // no attempts yet) in the same statement that finishes the job, so the webhook is as durable
  // as the outcome. Off by default.
  virtual void set_webhooks(bool on) = 0;
  // In one transaction, takes up to `max` owed webhooks due at `now_ms` (webhook_due_ms <=
  // now), oldest due first; each gets webhook_attempts+1 and webhook_due_ms = now + lease_ms (a
  // lease: a dispatcher that dies leaves it due again after the lease).
  virtual std::vector<Job> claim_webhooks(std::size_t max, std::int64_t now_ms,
                                          std::int64_t lease_ms) = 0;
  // Records a claimed webhook's outcome: `state` delivered or given_up ends it; owed keeps it
  // owed, due at `due_ms` (a retry). False if unknown or no longer owed.
  virtual bool mark_webhook(std::string_view id, WebhookState state, std::int64_t due_ms,
                            std::int64_t now_ms) = 0;
  // A claimed webhook whose delivery was cancelled (a stop) before it ended: due at `now_ms`
  // again, webhook_attempts-1 (the attempt does not count). False if unknown or not owed.
  virtual bool release_webhook(std::string_view id, std::int64_t now_ms) = 0;
  // Webhooks owed now (an index walk over the owed ones only).
  virtual std::int64_t count_webhooks_owed() = 0;

  // What the store did to its write-ahead log so far. Any thread, at any time (atomic counts;
  // not one snapshot).
  virtual CheckpointStats checkpoint_stats() const noexcept { return {}; }
};

// Opens or creates the SQLite job store at `path` (its directory must exist) in WAL mode.
// synchronous_full: fsync on every commit, so a power cut loses no committed job; otherwise
// (NORMAL) a kill -9 loses nothing but a power cut may lose the last commits.
//
// WAL checkpoints stay off the commit path: the writing connection does not checkpoint in its
// commits as SQLite does by default (PRAGMA wal_autocheckpoint); a checkpoint thread of the
// store, with a connection of its own, copies the WAL into the database (PASSIVE checkpoints,
// beside the writer) whenever sqlite_wal_checkpoint_pages pages wait; it starts with the first
// such pass (a store that never gets there runs none) and is joined when the store closes. If
// the system refuses the thread, commits checkpoint from that threshold on, as SQLite's own. Under
// a steady stream of commits a passive checkpoint is never complete (the writer appends while it
// copies), and SQLite starts the WAL over only at a write that begins with every page copied: so
// once the checkpoint thread has left at most sqlite_wal_tail_pages uncopied, the next commit
// copies those itself. Should the thread fall behind (a reader that holds an old snapshot, a slow
// disk), every commit past sqlite_wal_bound_pages checkpoints as SQLite's own would, so the WAL
// stays bounded whatever happens to the thread.
std::unique_ptr<JobStore> open_sqlite_store(const std::string& path, bool synchronous_full);

// WAL pages (of the database's page size, 4 KiB) not yet copied into the database at which the
// checkpoint thread is woken: SQLite's own auto-checkpoint threshold.
inline constexpr int sqlite_wal_checkpoint_pages = 1000;
// At most this many pages left uncopied by the checkpoint thread are copied by the commit
// that finds them, so that the WAL starts over (about the commits made during one checkpoint;
// with more, the thread runs again first).
inline constexpr int sqlite_wal_tail_pages = 250;
// A WAL this long (pages) is checkpointed by every commit, as without the thread.
inline constexpr int sqlite_wal_bound_pages = 4 * sqlite_wal_checkpoint_pages;

// The schema version open_sqlite_store creates and upgrades to (PRAGMA user_version). Older
// stores are migrated in place, one step per version (2: retention, 3: job owners and
// Idempotency-Keys per owner, 4: webhooks, 5: the state CHECK written without an IN list);
// newer ones are refused untouched.
inline constexpr int sqlite_schema_version = 5;
// PRAGMA application_id of a squall job store ("Sqal"): another program's SQLite file is
// recognised, and refused, before anything is written to it.
inline constexpr std::int32_t sqlite_application_id = 0x5371616c;

// SHA-256 of `payload`, 32 raw bytes: Job::payload_digest.
std::string payload_digest(std::string_view payload);

// An exclusive lock on "<store>.lock" (flock), held by the one squalld process that uses the
// store on this node. Whoever gets it knows that every job left in `sending` was leased by a
// process that is gone (kill -9, a crash), so it may reclaim those jobs at once instead of
// waiting out their lease. The lock ends with the process, however it dies.
class StoreLock {
 public:
  // Tries to take the lock without waiting. `holder` gets the pid written by the process that
  // holds it when it is taken, or "" otherwise. Throws std::runtime_error naming the lock file
  // when it cannot be opened. A store without a file (":memory:", "file:" URIs) is never
  // shared: acquired, with no lock file.
  static StoreLock try_acquire(const std::string& store_path, std::string& holder);
  StoreLock(StoreLock&& other) noexcept;
  StoreLock& operator=(StoreLock&& other) noexcept;
  ~StoreLock();
  StoreLock(const StoreLock&) = delete;
  StoreLock& operator=(const StoreLock&) = delete;

  bool acquired() const noexcept { return acquired_; }

 private:
  StoreLock() = default;
  int fd_ = -1;            // The lock file, open while the lock is held; -1 otherwise.
  bool acquired_ = false;  // The lock is ours (or there is no file to share).
};

// A fresh job id, 32 lowercase hex digits: 48 bits of Unix milliseconds, then 80 random bits
// from getrandom(2), so ids sort by creation and cannot be guessed.
std::string new_job_id();
// The same, with `now_ms` as its time (a store's insert_batch names its jobs with it).
std::string new_job_id(std::int64_t now_ms);

}  // namespace squall::jobs

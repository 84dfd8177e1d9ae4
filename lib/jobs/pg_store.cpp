#include "squall/jobs/pg_store.hpp"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <limits>
#include <random>
#include <stdexcept>
#include <tuple>
#include <utility>
#include <vector>

#include <libpq-fe.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

namespace squall::jobs {

namespace {

// Type OIDs of the parameters (pg_type.h is a server header).
constexpr Oid kInt8 = 20;
constexpr Oid kInt4 = 23;
constexpr Oid kText = 25;
constexpr Oid kBytea = 17;
constexpr Oid kBool = 16;

// Reconnection backoff of a lost connection.
constexpr std::int64_t kReconnectInitialMs = 100;
constexpr std::int64_t kReconnectMaxMs = 5000;
// How often claim() looks for nodes that are gone (their advisory lock is free).
constexpr std::int64_t kDeadNodeCheckMs = 1000;

std::int64_t steady_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Version 1: the whole schema of SQLite's version 4 in PostgreSQL's types, plus the node that
// holds each lease. Every text a client can influence (kind, key, owner, error) is bytea, as
// SQLite stores any bytes: a UTF8 database would refuse an Idempotency-Key of arbitrary octets.
// seq keeps claim's last tie in insertion order; jobs_due serves claims and the stats' oldest
// waiting job; the partial indexes serve the purge, the webhooks and the Idempotency-Keys.
constexpr const char* schema_v1_sql = R"sql(
CREATE TABLE squall_schema (version integer NOT NULL);
CREATE TABLE squall_jobs (
  seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  id text NOT NULL UNIQUE,
  kind bytea NOT NULL,
  state text NOT NULL CHECK (state IN ('queued', 'sending', 'retrying', 'sent', 'failed')),
  payload bytea NOT NULL,
  idempotency_key bytea NOT NULL DEFAULT '',
  attempts integer NOT NULL DEFAULT 0,
  last_error bytea NOT NULL DEFAULT '',
  created_ms bigint NOT NULL,
  updated_ms bigint NOT NULL,
  run_after_ms bigint NOT NULL,
  lease_until_ms bigint NOT NULL DEFAULT 0,
  finished_ms bigint NOT NULL DEFAULT 0,
  payload_digest bytea NOT NULL DEFAULT '',
  owner bytea NOT NULL DEFAULT '',
  webhook_state integer NOT NULL DEFAULT 0,
  webhook_attempts integer NOT NULL DEFAULT 0,
  webhook_due_ms bigint NOT NULL DEFAULT 0,
  lease_node integer NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX squall_jobs_owner_idempotency_key ON squall_jobs (owner, idempotency_key)
  WHERE idempotency_key <> '';
CREATE INDEX squall_jobs_due ON squall_jobs (state, run_after_ms, created_ms, seq);
CREATE INDEX squall_jobs_finished ON squall_jobs (finished_ms) WHERE finished_ms > 0;
CREATE INDEX squall_jobs_webhooks_due ON squall_jobs (webhook_due_ms) WHERE webhook_state = 1;
CREATE TABLE squall_probe (id integer PRIMARY KEY CHECK (id = 1), written_ms bigint NOT NULL);
)sql";

// Version 2: waiting jobs held by a node's prefetch (state queued or retrying, a lease), so
// that the check for gone nodes finds them without reading every waiting row.
constexpr const char* schema_v2_sql = R"sql(
CREATE INDEX squall_jobs_held ON squall_jobs (lease_node)
  WHERE state IN ('queued', 'retrying') AND lease_until_ms > 0;
)sql";

// migrations[i] upgrades version i to i + 1; a new version adds one entry at the end.
constexpr const char* migrations[] = {schema_v1_sql, schema_v2_sql};
static_assert(std::size(migrations) == postgresql_schema_version);

#define SQUALL_JOB_COLUMNS                                                                    \
  "id, kind, state, payload, idempotency_key, attempts, last_error, created_ms, updated_ms, " \
  "run_after_ms, lease_until_ms, finished_ms, payload_digest, owner, webhook_state, "         \
  "webhook_attempts, webhook_due_ms"
#define SQUALL_J_COLUMNS                                                            \
  "j.id, j.kind, j.state, j.payload, j.idempotency_key, j.attempts, j.last_error, " \
  "j.created_ms, j.updated_ms, j.run_after_ms, j.lease_until_ms, j.finished_ms, "   \
  "j.payload_digest, j.owner, j.webhook_state, j.webhook_attempts, j.webhook_due_ms, j.seq"
constexpr int kSeqColumn = 17;

// One prepared statement: its name on the connection, its text and parameter types.
struct StatementSpec {
  const char* name;
  const char* sql;
  std::vector<Oid> types;
};

const StatementSpec kInsert{
    "squall_insert",
    "INSERT INTO squall_jobs (id, kind, state, payload, idempotency_key, created_ms, updated_ms, "
    "run_after_ms, payload_digest, owner) VALUES ($1, $2, 'queued', $3, $4, $5, $5, $5, $6, $7) "
    "ON CONFLICT (owner, idempotency_key) WHERE idempotency_key <> '' DO NOTHING",
    {kText, kBytea, kBytea, kBytea, kInt8, kBytea, kBytea}};
const StatementSpec kGetById{
    "squall_get_by_id", "SELECT " SQUALL_JOB_COLUMNS " FROM squall_jobs WHERE id = $1", {kText}};
const StatementSpec kGetByKey{"squall_get_by_key",
                              "SELECT " SQUALL_JOB_COLUMNS
                              " FROM squall_jobs WHERE owner = $2 AND idempotency_key = $1 "
                              "AND idempotency_key <> ''",
                              {kBytea, kBytea}};
// Each branch walks squall_jobs_due in order and locks at most $3 rows, skipping rows that
// another node's claim holds; the rows locked but not chosen are free again at the commit.
// Waiting jobs held by a prefetch (lease_until_ms in the future) are skipped.
#define SQUALL_DUE_CHOSEN                                                                       \
  "WITH queued AS (SELECT seq, run_after_ms, created_ms FROM squall_jobs WHERE state = "        \
  "'queued' AND run_after_ms <= $1 AND lease_until_ms < $1 ORDER BY run_after_ms, created_ms, " \
  "seq LIMIT $3 FOR UPDATE SKIP LOCKED), retrying AS (SELECT seq, run_after_ms, created_ms "    \
  "FROM squall_jobs WHERE state = 'retrying' AND run_after_ms <= $1 AND lease_until_ms < $1 "   \
  "ORDER BY run_after_ms, created_ms, seq LIMIT $3 FOR UPDATE SKIP LOCKED), expired AS "        \
  "(SELECT seq, run_after_ms, created_ms FROM squall_jobs WHERE state = 'sending' AND "         \
  "lease_until_ms < $1 ORDER BY run_after_ms, created_ms, seq LIMIT $3 FOR UPDATE SKIP "        \
  "LOCKED), chosen AS (SELECT seq FROM (SELECT * FROM queued UNION ALL SELECT * FROM "          \
  "retrying UNION ALL SELECT * FROM expired) due ORDER BY run_after_ms, created_ms, seq LIMIT " \
  "$3) "
const StatementSpec kClaim{
    "squall_claim",
    SQUALL_DUE_CHOSEN
    "UPDATE squall_jobs AS j SET state = 'sending', attempts = j.attempts + 1, lease_until_ms = "
    "$2, updated_ms = $1, lease_node = $4 FROM chosen WHERE j.seq = chosen.seq "
    "RETURNING " SQUALL_J_COLUMNS,
    {kInt8, kInt8, kInt8, kInt4}};
// A hold leaves a waiting job's state and attempts; an expired sending one waits as retrying.
const StatementSpec kHold{
    "squall_hold",
    SQUALL_DUE_CHOSEN
    "UPDATE squall_jobs AS j SET state = CASE WHEN j.state = 'sending' THEN 'retrying' ELSE "
    "j.state END, lease_until_ms = $2, updated_ms = $1, lease_node = $4 FROM chosen WHERE j.seq "
    "= chosen.seq RETURNING " SQUALL_J_COLUMNS,
    {kInt8, kInt8, kInt8, kInt4}};
#undef SQUALL_DUE_CHOSEN
const StatementSpec kStart{
    "squall_start",
    "UPDATE squall_jobs SET state = 'sending', attempts = attempts + 1, lease_until_ms = $3, "
    "updated_ms = $2, lease_node = $4 WHERE id = $1 AND state IN ('queued', 'retrying')",
    {kText, kInt8, kInt8, kInt4}};
#define SQUALL_WEBHOOK_OWED                                                                   \
  "webhook_state = CASE WHEN $3 THEN 1 ELSE webhook_state END, webhook_attempts = CASE WHEN " \
  "$3 THEN 0 ELSE webhook_attempts END, webhook_due_ms = CASE WHEN $3 THEN $2 ELSE "          \
  "webhook_due_ms END"
const StatementSpec kMarkSent{
    "squall_mark_sent",
    "UPDATE squall_jobs SET state = 'sent', payload = '', lease_until_ms = 0, updated_ms = $2, "
    "finished_ms = $2, " SQUALL_WEBHOOK_OWED " WHERE id = $1 AND state <> 'sent'",
    {kText, kInt8, kBool}};
const StatementSpec kMarkRetry{
    "squall_mark_retry",
    "UPDATE squall_jobs SET state = 'retrying', last_error = $2, run_after_ms = $3, "
    "lease_until_ms = 0, updated_ms = $4 WHERE id = $1 AND state = 'sending'",
    {kText, kBytea, kInt8, kInt8}};
const StatementSpec kMarkFailed{
    "squall_mark_failed",
    "UPDATE squall_jobs SET state = 'failed', last_error = $4, lease_until_ms = 0, updated_ms = "
    "$2, finished_ms = $2, " SQUALL_WEBHOOK_OWED " WHERE id = $1 AND state = 'sending'",
    {kText, kInt8, kBool, kBytea}};
#undef SQUALL_WEBHOOK_OWED
const StatementSpec kRelease{
    "squall_release",
    "UPDATE squall_jobs SET state = CASE WHEN state = 'sending' THEN 'queued' ELSE state END, "
    "attempts = CASE WHEN state = 'sending' THEN greatest(attempts - 1, 0) ELSE attempts END, "
    "lease_until_ms = 0, updated_ms = $2 WHERE id = $1 AND (state = 'sending' OR (state IN "
    "('queued', 'retrying') AND lease_until_ms > 0))",
    {kText, kInt8}};
const StatementSpec kNotify{"squall_notify", "SELECT pg_notify('squall_jobs', '')", {}};
const StatementSpec kCountPending{
    "squall_count_pending",
    "SELECT count(*) FROM squall_jobs WHERE state IN ('queued', 'retrying', 'sending')",
    {}};
const StatementSpec kPendingByOwner{
    "squall_pending_by_owner",
    "SELECT owner, count(*), coalesce(sum(octet_length(payload)), 0)::bigint FROM squall_jobs "
    "WHERE state IN ('queued', 'retrying', 'sending') GROUP BY owner",
    {}};
// One statement, so both figures come from one snapshot.
const StatementSpec kStats{"squall_stats",
                           "SELECT state, count(*), coalesce(min(created_ms) FILTER (WHERE state "
                           "IN ('queued', 'retrying')), 0) FROM squall_jobs GROUP BY state",
                           {}};
const StatementSpec kPurge{
    "squall_purge",
    "DELETE FROM squall_jobs WHERE seq IN (SELECT seq FROM squall_jobs WHERE finished_ms > 0 AND "
    "finished_ms < $1 AND webhook_state <> 1 ORDER BY finished_ms LIMIT $2 FOR UPDATE SKIP "
    "LOCKED)",
    {kInt8, kInt8}};
const StatementSpec kExpireLeases{
    "squall_expire_leases",
    "UPDATE squall_jobs SET lease_until_ms = 0, updated_ms = $1 WHERE state = 'sending'",
    {kInt8}};
const StatementSpec kExpireHolds{"squall_expire_holds",
                                 "UPDATE squall_jobs SET lease_until_ms = 0, updated_ms = $1 "
                                 "WHERE state IN ('queued', 'retrying') AND lease_until_ms > 0",
                                 {kInt8}};
const StatementSpec kProbe{"squall_probe",
                           "INSERT INTO squall_probe (id, written_ms) VALUES (1, $1) ON CONFLICT "
                           "(id) DO UPDATE SET written_ms = excluded.written_ms",
                           {kInt8}};
const StatementSpec kClaimWebhooks{
    "squall_claim_webhooks",
    "UPDATE squall_jobs AS j SET webhook_attempts = j.webhook_attempts + 1, webhook_due_ms = $2 "
    "WHERE j.seq IN (SELECT seq FROM squall_jobs WHERE webhook_state = 1 AND webhook_due_ms <= "
    "$1 ORDER BY webhook_due_ms LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING " SQUALL_J_COLUMNS,
    {kInt8, kInt8, kInt8}};
const StatementSpec kMarkWebhook{"squall_mark_webhook",
                                 "UPDATE squall_jobs SET webhook_state = $2, webhook_due_ms = $3 "
                                 "WHERE id = $1 AND webhook_state = 1",
                                 {kText, kInt4, kInt8}};
const StatementSpec kReleaseWebhook{
    "squall_release_webhook",
    "UPDATE squall_jobs SET webhook_due_ms = $2, webhook_attempts = greatest(webhook_attempts - "
    "1, 0) WHERE id = $1 AND webhook_state = 1",
    {kText, kInt8}};
const StatementSpec kCountWebhooks{
    "squall_count_webhooks", "SELECT count(*) FROM squall_jobs WHERE webhook_state = 1", {}};
// Nodes that hold leases now (sending jobs, or waiting ones held by a prefetch), other than
// this one.
const StatementSpec kLeaseNodes{
    "squall_lease_nodes",
    "SELECT lease_node FROM squall_jobs WHERE state = 'sending' AND lease_node <> $1 AND "
    "lease_node <> 0 UNION SELECT lease_node FROM squall_jobs WHERE state IN ('queued', "
    "'retrying') AND lease_until_ms > 0 AND lease_node <> $1 AND lease_node <> 0",
    {kInt4}};
const StatementSpec kTryNodeLock{
    "squall_try_node_lock", "SELECT pg_try_advisory_lock($1, $2)", {kInt4, kInt4}};
const StatementSpec kNodeUnlock{
    "squall_node_unlock", "SELECT pg_advisory_unlock($1, $2)", {kInt4, kInt4}};
const StatementSpec kExpireNode{
    "squall_expire_node",
    "UPDATE squall_jobs SET lease_until_ms = 0 WHERE lease_node = $1 AND (state = 'sending' OR "
    "(state IN ('queued', 'retrying') AND lease_until_ms > 0))",
    {kInt4}};

const StatementSpec* const kStatements[] = {
    &kInsert,         &kGetById,     &kGetByKey,       &kClaim,         &kMarkSent,
    &kMarkRetry,      &kMarkFailed,  &kRelease,        &kNotify,        &kCountPending,
    &kPendingByOwner, &kStats,       &kPurge,          &kExpireLeases,  &kProbe,
    &kClaimWebhooks,  &kMarkWebhook, &kReleaseWebhook, &kCountWebhooks, &kLeaseNodes,
    &kTryNodeLock,    &kNodeUnlock,  &kExpireNode,     &kHold,          &kStart,
    &kExpireHolds,
};

#undef SQUALL_JOB_COLUMNS
#undef SQUALL_J_COLUMNS

// Parameters in binary format: text and bytea as their bytes, integers in network order.
class Params {
 public:
  Params& bytes(std::string_view value) {
    values_.emplace_back(value);
    return *this;
  }
  Params& int8(std::int64_t value) { return big_endian(static_cast<std::uint64_t>(value), 8); }
  Params& int4(std::int32_t value) { return big_endian(static_cast<std::uint32_t>(value), 4); }
  Params& boolean(bool value) {
    values_.emplace_back(1, value ? '\1' : '\0');
    return *this;
  }

  int size() const { return static_cast<int>(values_.size()); }
  // Pointers into values_, valid while it is unchanged.
  void arrays(std::vector<const char*>& values, std::vector<int>& lengths,
              std::vector<int>& formats) const {
    for (const std::string& value : values_) {
      values.push_back(value.data());
      lengths.push_back(static_cast<int>(value.size()));
      formats.push_back(1);
    }
  }

 private:
  // The low `size` bytes of `bits`, most significant first (network order).
  Params& big_endian(std::uint64_t bits, int size) {
    std::string out(static_cast<std::size_t>(size), '\0');
    for (int i = 0; i < size; ++i) out[i] = static_cast<char>(bits >> (8 * (size - 1 - i)));
    values_.push_back(std::move(out));
    return *this;
  }
  std::deque<std::string> values_;  // One per parameter.
};

// A PGresult freed at the end of its scope.
class Result {
 public:
  explicit Result(PGresult* result = nullptr) noexcept : result_(result) {}
  ~Result() { PQclear(result_); }
  Result(Result&& other) noexcept : result_(std::exchange(other.result_, nullptr)) {}
  Result& operator=(Result&& other) noexcept {
    if (this != &other) {
      PQclear(result_);
      result_ = std::exchange(other.result_, nullptr);
    }
    return *this;
  }
  Result(const Result&) = delete;
  Result& operator=(const Result&) = delete;

  PGresult* get() const noexcept { return result_; }
  int rows() const noexcept { return PQntuples(result_); }
  // Rows changed by an INSERT, UPDATE or DELETE.
  std::int64_t changed() const {
    const char* text = PQcmdTuples(result_);
    return text != nullptr && *text != '\0' ? std::stoll(text) : 0;
  }
  std::string bytes(int row, int column) const {
    return std::string(PQgetvalue(result_, row, column),
                       static_cast<std::size_t>(PQgetlength(result_, row, column)));
  }
  // A binary int8, int4 or bool (big-endian, any width up to 8).
  std::int64_t integer(int row, int column) const {
    const auto* data = reinterpret_cast<const unsigned char*>(PQgetvalue(result_, row, column));
    const int length = PQgetlength(result_, row, column);
    if (length == 0) return 0;
    std::uint64_t value = (data[0] & 0x80) != 0 ? ~std::uint64_t{0} : 0;  // Sign extension.
    for (int i = 0; i < length; ++i) value = (value << 8) | data[i];
    return static_cast<std::int64_t>(value);
  }

 private:
  PGresult* result_;  // Owned.
};

std::string trimmed(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

// Opens a connection with squall's defaults, which the URL's own parameters override: a
// connect timeout (so a store thread never waits forever for an unreachable server), TCP
// keepalives (a server that vanished is noticed in about a minute) and an application name.
PGconn* connect(const std::string& url) {
  const char* keywords[] = {"connect_timeout",
                            "application_name",
                            "keepalives_idle",
                            "keepalives_interval",
                            "keepalives_count",
                            "dbname",
                            nullptr};
  const char* values[] = {"5", "squalld", "30", "10", "3", url.c_str(), nullptr};
  PGconn* conn = PQconnectdbParams(keywords, values, 1);
  // NOTICEs (e.g. from an operator's trigger) would go to stderr: the error log has them not.
  if (conn != nullptr)
    PQsetNoticeProcessor(
        conn, [](void*, const char*) {}, nullptr);
  return conn;
}

class PostgresJobStore final : public JobStore {
 public:
  PostgresJobStore(const std::string& url, bool synchronous_commit);
  ~PostgresJobStore() override { PQfinish(conn_); }

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

 private:
  // A transaction that nests, as SqliteJobStore's: only the outermost begins and commits, and
  // any scope left without commit() dooms all of it.
  class Transaction {
   public:
    Transaction(PostgresJobStore& store, const char* operation);
    ~Transaction();
    Transaction(const Transaction&) = delete;
    Transaction& operator=(const Transaction&) = delete;
    void commit();

   private:
    PostgresJobStore& store_;  // The store whose transaction this is.
    const char* operation_;    // Named in errors.
    bool committed_ = false;   // commit() ran for this scope.
  };

  [[noreturn]] void fail(const char* operation, const std::string& detail) const;
  // Connects again if the connection was lost and its backoff has passed; throws otherwise.
  void ensure_connected(const char* operation);
  void set_up_session();
  void take_node_number();
  void migrate();
  Result exec(const char* sql, const char* operation);
  Result run(const StatementSpec& statement, const Params& params, const char* operation);
  Job read_job(const Result& result, int row, const char* operation) const;
  std::optional<Job> find_one(const StatementSpec& statement, const Params& params,
                              const char* operation);
  std::vector<Job> claimed_in_order(const Result& result, const char* operation, bool by_run_after);
  // claim() and hold(): `statement` (kClaim or kHold), after the check for gone nodes.
  std::vector<Job> take_due(const StatementSpec& statement, const char* operation, std::size_t max,
                            std::int64_t now_ms, std::int64_t lease_ms);
  void reclaim_from_gone_nodes();
  void rollback() noexcept;

  std::string url_;                        // The libpq URI.
  std::string display_;                    // url_ without a password: named in every error.
  bool synchronous_commit_;                // durability = "full".
  PGconn* conn_ = nullptr;                 // The connection (PQreset after a loss).
  std::int32_t node_ = 0;                  // This connection's node number (its advisory lock).
  int transaction_depth_ = 0;              // Nested Transaction scopes open now.
  bool transaction_doomed_ = false;        // An inner scope failed: the outermost rolls back.
  bool webhooks_ = false;                  // set_webhooks.
  std::string lost_;                       // Why the connection was lost; "" while connected.
  std::int64_t reconnect_at_ms_ = 0;       // steady_ms() of the next attempt.
  std::int64_t reconnect_backoff_ms_ = 0;  // The wait after the next failed attempt.
  std::int64_t next_gone_check_ms_ = 0;    // steady_ms() of the next reclaim_from_gone_nodes.
  std::mt19937 random_{std::random_device{}()};  // Node numbers.
};

PostgresJobStore::PostgresJobStore(const std::string& url, bool synchronous_commit)
    : url_(url), display_(postgresql_display_url(url)), synchronous_commit_(synchronous_commit) {
  conn_ = connect(url_);
  if (conn_ == nullptr) fail("connect", "out of memory");
  if (PQstatus(conn_) != CONNECTION_OK) {
    const std::string error = trimmed(PQerrorMessage(conn_));
    PQfinish(conn_);
    conn_ = nullptr;
    fail("connect", error);
  }
  try {
    set_up_session();
    migrate();
    for (const StatementSpec* statement : kStatements) {
      Result prepared(PQprepare(conn_, statement->name, statement->sql,
                                static_cast<int>(statement->types.size()),
                                statement->types.data()));
      if (PQresultStatus(prepared.get()) != PGRES_COMMAND_OK) {
        fail("prepare", trimmed(PQresultErrorMessage(prepared.get())));
      }
    }
    take_node_number();
  } catch (...) {
    PQfinish(conn_);
    conn_ = nullptr;
    throw;
  }
}

void PostgresJobStore::fail(const char* operation, const std::string& detail) const {
  throw std::runtime_error("job store " + display_ + ": " + operation + ": " + detail);
}

void PostgresJobStore::set_up_session() {
  // lock_timeout: as SQLite's busy timeout, a lock held by another program for longer is a
  // store fault (503) rather than a wait without end; statement_timeout bounds any statement.
  exec(synchronous_commit_ ? "SET synchronous_commit = on" : "SET synchronous_commit = off",
       "set synchronous_commit");
  exec("SET lock_timeout = '5s'", "set lock_timeout");
  exec("SET statement_timeout = '60s'", "set statement_timeout");
}

void PostgresJobStore::take_node_number() {
  // A number no live node holds: its session lock is ours until the connection ends. After a
  // reconnection the old number is taken again if it is still free, so the leases taken
  // before stay ours.
  std::uniform_int_distribution<std::int32_t> numbers(1, std::numeric_limits<std::int32_t>::max());
  std::int32_t candidate = node_ != 0 ? node_ : numbers(random_);
  for (int tries = 0; tries < 20; ++tries) {
    Params params;
    params.int4(postgresql_lock_class).int4(candidate);
    const Result locked = run(kTryNodeLock, params, "take a node number");
    if (locked.rows() == 1 && locked.integer(0, 0) != 0) {
      node_ = candidate;
      return;
    }
    candidate = numbers(random_);
  }
  fail("take a node number", "no free advisory lock after 20 tries");
}

void PostgresJobStore::migrate() {
  // One node at a time: the others wait on this transaction's advisory lock (key 0 is never
  // a node number), then find the schema made.
  Transaction transaction(*this, "migrate the schema");
  {
    Params params;
    params.int4(postgresql_lock_class).int4(0);
    std::vector<const char*> values;
    std::vector<int> lengths, formats;
    params.arrays(values, lengths, formats);
    Result locked(PQexecParams(conn_, "SELECT pg_advisory_xact_lock($1::integer, $2::integer)", 2,
                               nullptr, values.data(), lengths.data(), formats.data(), 1));
    if (PQresultStatus(locked.get()) != PGRES_TUPLES_OK) {
      transaction_doomed_ = true;
      fail("migrate the schema", trimmed(PQresultErrorMessage(locked.get())));
    }
  }
  const Result found = exec(
      "SELECT to_regclass('squall_schema') IS NOT NULL, to_regclass('squall_jobs') IS NOT NULL",
      "read the schema version");
  const bool has_schema = std::string(PQgetvalue(found.get(), 0, 0)) == "t";
  const bool has_jobs = std::string(PQgetvalue(found.get(), 0, 1)) == "t";
  int version = 0;
  if (has_schema) {
    const Result row = exec("SELECT version FROM squall_schema", "read the schema version");
    if (row.rows() != 1) {
      fail("read the schema version",
           "squall_schema has " + std::to_string(row.rows()) +
               " rows instead of one; refusing to use the database (nothing was written)");
    }
    version = std::stoi(PQgetvalue(row.get(), 0, 0));
  } else if (has_jobs) {
    fail("read the schema version",
         "a table squall_jobs exists without squall_schema: it belongs to another program; "
         "refusing to use the database (nothing was written)");
  }
  if (version > postgresql_schema_version) {
    fail("read the schema version",
         "schema version " + std::to_string(version) + " is newer than this squall supports (" +
             std::to_string(postgresql_schema_version) +
             "): written by a later squall; refusing to use the database (nothing was written)");
  }
  if (version == postgresql_schema_version) {
    transaction.commit();
    return;
  }
  for (int step = version; step < postgresql_schema_version; ++step) {
    exec(migrations[step], ("migrate to schema version " + std::to_string(step + 1)).c_str());
  }
  exec(version == 0 ? "INSERT INTO squall_schema (version) VALUES (1)" : "SELECT 1",
       "record the schema version");
  exec(("UPDATE squall_schema SET version = " + std::to_string(postgresql_schema_version)).c_str(),
       "record the schema version");
  transaction.commit();
}

void PostgresJobStore::ensure_connected(const char* operation) {
  if (conn_ != nullptr && PQstatus(conn_) == CONNECTION_OK) return;
  if (transaction_depth_ > 0) fail(operation, "the connection to the database was lost");
  const std::int64_t now = steady_ms();
  if (now < reconnect_at_ms_) {
    fail(operation, "not connected to the database (" + lost_ + "); trying again in " +
                        std::to_string(reconnect_at_ms_ - now) + " ms");
  }
  PQreset(conn_);
  if (PQstatus(conn_) == CONNECTION_OK) {
    try {
      set_up_session();
      for (const StatementSpec* statement : kStatements) {
        Result prepared(PQprepare(conn_, statement->name, statement->sql,
                                  static_cast<int>(statement->types.size()),
                                  statement->types.data()));
        if (PQresultStatus(prepared.get()) != PGRES_COMMAND_OK) {
          fail("prepare", trimmed(PQresultErrorMessage(prepared.get())));
        }
      }
      const std::int32_t before = node_;
      take_node_number();
      spdlog::info("jobs: job store {}: connected again (node {}{})", display_, node_,
                   node_ == before ? "" : ", a new number: the old one was taken over");
      lost_.clear();
      reconnect_backoff_ms_ = 0;
      return;
    } catch (const std::exception& error) {
      lost_ = error.what();
    }
  } else {
    lost_ = trimmed(PQerrorMessage(conn_));
  }
  reconnect_backoff_ms_ = reconnect_backoff_ms_ == 0
                              ? kReconnectInitialMs
                              : std::min(reconnect_backoff_ms_ * 2, kReconnectMaxMs);
  reconnect_at_ms_ = steady_ms() + reconnect_backoff_ms_;
  fail(operation, "connecting again failed: " + lost_);
}

Result PostgresJobStore::exec(const char* sql, const char* operation) {
  Result result(PQexec(conn_, sql));
  const ExecStatusType status = PQresultStatus(result.get());
  if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
    if (transaction_depth_ > 0) transaction_doomed_ = true;
    const std::string error = trimmed(result.get() != nullptr ? PQresultErrorMessage(result.get())
                                                              : PQerrorMessage(conn_));
    if (PQstatus(conn_) != CONNECTION_OK && lost_.empty()) {
      lost_ = error;
      reconnect_at_ms_ = 0;
    }
    fail(operation, error);
  }
  return result;
}

Result PostgresJobStore::run(const StatementSpec& statement, const Params& params,
                             const char* operation) {
  std::vector<const char*> values;
  std::vector<int> lengths, formats;
  params.arrays(values, lengths, formats);
  Result result(PQexecPrepared(conn_, statement.name, params.size(), values.data(), lengths.data(),
                               formats.data(), 1));
  const ExecStatusType status = PQresultStatus(result.get());
  if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
    if (transaction_depth_ > 0) transaction_doomed_ = true;
    const std::string error = trimmed(result.get() != nullptr ? PQresultErrorMessage(result.get())
                                                              : PQerrorMessage(conn_));
    if (PQstatus(conn_) != CONNECTION_OK && lost_.empty()) {
      lost_ = error.empty() ? "the connection was closed" : error;
      reconnect_at_ms_ = 0;  // The first attempt is at once: the server may just have restarted.
    }
    fail(operation, error);
  }
  return result;
}

Job PostgresJobStore::read_job(const Result& result, int row, const char* operation) const {
  Job job;
  job.id = result.bytes(row, 0);
  job.kind = result.bytes(row, 1);
  const std::string state = result.bytes(row, 2);
  const std::optional<JobState> parsed = parse_job_state(state);
  if (!parsed) {
    fail(operation, "job " + job.id + " has an unknown state '" + state + "'");
  }
  job.state = *parsed;
  job.payload = result.bytes(row, 3);
  job.idempotency_key = result.bytes(row, 4);
  job.attempts = static_cast<int>(result.integer(row, 5));
  job.last_error = result.bytes(row, 6);
  job.created_ms = result.integer(row, 7);
  job.updated_ms = result.integer(row, 8);
  job.run_after_ms = result.integer(row, 9);
  job.lease_until_ms = result.integer(row, 10);
  job.finished_ms = result.integer(row, 11);
  job.payload_digest = result.bytes(row, 12);
  job.owner = result.bytes(row, 13);
  const std::int64_t webhook = result.integer(row, 14);
  if (webhook < 0 || webhook > static_cast<int>(WebhookState::given_up)) {
    fail(operation, "job " + job.id + " has an unknown webhook_state " + std::to_string(webhook));
  }
  job.webhook = static_cast<WebhookState>(webhook);
  job.webhook_attempts = static_cast<int>(result.integer(row, 15));
  job.webhook_due_ms = result.integer(row, 16);
  return job;
}

std::optional<Job> PostgresJobStore::find_one(const StatementSpec& statement, const Params& params,
                                              const char* operation) {
  const Result result = run(statement, params, operation);
  if (result.rows() == 0) return std::nullopt;
  return read_job(result, 0, operation);
}

void PostgresJobStore::rollback() noexcept {
  if (conn_ == nullptr || PQstatus(conn_) != CONNECTION_OK) return;
  if (PQtransactionStatus(conn_) == PQTRANS_IDLE) return;
  PQclear(PQexec(conn_, "ROLLBACK"));
}

PostgresJobStore::Transaction::Transaction(PostgresJobStore& store, const char* operation)
    : store_(store), operation_(operation) {
  if (store_.transaction_depth_ == 0) {
    store_.ensure_connected(operation_);
    store_.exec("BEGIN", operation_);
    store_.transaction_doomed_ = false;
  }
  ++store_.transaction_depth_;
}

PostgresJobStore::Transaction::~Transaction() {
  --store_.transaction_depth_;
  if (!committed_) store_.transaction_doomed_ = true;
  if (store_.transaction_depth_ == 0 && store_.transaction_doomed_) store_.rollback();
}

void PostgresJobStore::Transaction::commit() {
  if (store_.transaction_depth_ > 1) {
    committed_ = true;  // The outermost scope commits.
    return;
  }
  if (store_.transaction_doomed_) {
    store_.fail(operation_, "an operation inside the transaction failed; rolled back");
  }
  // COMMIT answers an error, not ROLLBACK, only when the server could not commit; a lost
  // connection leaves the outcome unknown, which the caller reports as a failure.
  const Result result = store_.exec("COMMIT", operation_);
  const char* tag = PQcmdStatus(result.get());
  if (tag != nullptr && std::strcmp(tag, "ROLLBACK") == 0) {
    store_.fail(operation_, "the server rolled the transaction back");
  }
  committed_ = true;
}

std::vector<Inserted> PostgresJobStore::insert_batch(std::vector<NewJob> jobs,
                                                     std::int64_t now_ms) {
  std::vector<Inserted> results;
  if (jobs.empty()) return results;
  results.reserve(jobs.size());
  Transaction transaction(*this, "insert");
  // Every INSERT of the batch, then the NOTIFY, in one pipeline: one round trip to the server
  // for the whole batch instead of one per job. DO NOTHING on a known key: no row means the
  // key exists (a duplicate id is no target of the ON CONFLICT and raises an error).
  std::vector<Job> jobs_made(jobs.size());
  std::vector<bool> created(jobs.size(), false);
  std::string error;
  if (PQenterPipelineMode(conn_) != 1) fail("insert", trimmed(PQerrorMessage(conn_)));
  std::size_t sent = 0;
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    const NewJob& new_job = jobs[i];
    Job& job = jobs_made[i];
    job.id = new_job_id(now_ms);
    // Only a repeated Idempotency-Key compares digests: a keyless job needs none.
    if (!new_job.idempotency_key.empty()) job.payload_digest = payload_digest(new_job.payload);
    Params params;
    params.bytes(job.id)
        .bytes(new_job.kind)
        .bytes(new_job.payload)
        .bytes(new_job.idempotency_key)
        .int8(now_ms)
        .bytes(job.payload_digest)
        .bytes(new_job.owner);
    std::vector<const char*> values;
    std::vector<int> lengths, formats;
    params.arrays(values, lengths, formats);
    if (PQsendQueryPrepared(conn_, kInsert.name, params.size(), values.data(), lengths.data(),
                            formats.data(), 1) != 1) {
      error = trimmed(PQerrorMessage(conn_));
      break;
    }
    ++sent;
  }
  // Delivered to the listening nodes at the commit, and only if it commits.
  bool notify_sent = false;
  if (error.empty()) {
    notify_sent = PQsendQueryPrepared(conn_, kNotify.name, 0, nullptr, nullptr, nullptr, 1) == 1;
    if (!notify_sent) error = trimmed(PQerrorMessage(conn_));
  }
  if (PQpipelineSync(conn_) != 1 && error.empty()) error = trimmed(PQerrorMessage(conn_));
  // Every result up to the sync is read, also after a failure (the rest are "aborted").
  const std::size_t expected = sent + (notify_sent ? 1 : 0);
  for (std::size_t i = 0; i < expected; ++i) {
    Result result(PQgetResult(conn_));
    const ExecStatusType status = PQresultStatus(result.get());
    if (result.get() == nullptr) {
      if (error.empty()) error = trimmed(PQerrorMessage(conn_));
      break;
    }
    if (status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK) {
      if (i < sent) created[i] = result.changed() > 0;
    } else if (status != PGRES_PIPELINE_ABORTED && error.empty()) {
      error = trimmed(PQresultErrorMessage(result.get()));
    }
    PQclear(PQgetResult(conn_));  // The null that ends each query's results.
  }
  for (;;) {  // Up to and including the sync.
    PGresult* rest = PQgetResult(conn_);
    if (rest == nullptr) {
      if (PQstatus(conn_) != CONNECTION_OK) break;
      continue;
    }
    const bool sync = PQresultStatus(rest) == PGRES_PIPELINE_SYNC;
    PQclear(rest);
    if (sync) break;
  }
  if (PQstatus(conn_) == CONNECTION_OK) PQexitPipelineMode(conn_);
  if (!error.empty()) {
    transaction_doomed_ = true;
    if (PQstatus(conn_) != CONNECTION_OK && lost_.empty()) {
      lost_ = error;
      reconnect_at_ms_ = 0;
    }
    fail("insert", error);
  }
  for (std::size_t i = 0; i < jobs.size(); ++i) {
    NewJob& new_job = jobs[i];
    Job& job = jobs_made[i];
    if (created[i]) {
      job.kind = std::move(new_job.kind);
      job.state = JobState::queued;
      job.payload = std::move(new_job.payload);
      job.idempotency_key = std::move(new_job.idempotency_key);
      job.owner = std::move(new_job.owner);
      job.created_ms = job.updated_ms = job.run_after_ms = now_ms;
      results.push_back(Inserted{std::move(job), true});
      continue;
    }
    // Read committed: the key's row is visible, whether this batch or another node stored it
    // (a concurrent insert of the same key waited for that node's commit).
    Params key;
    key.bytes(new_job.idempotency_key).bytes(new_job.owner);
    std::optional<Job> existing = find_one(kGetByKey, key, "insert: read the existing job");
    if (!existing) {
      fail("insert",
           "idempotency key '" + new_job.idempotency_key + "' conflicted but was not found");
    }
    results.push_back(Inserted{std::move(*existing), false});
  }
  transaction.commit();
  return results;
}

std::optional<Job> PostgresJobStore::get(std::string_view id) {
  ensure_connected("get");
  Params params;
  params.bytes(id);
  return find_one(kGetById, params, "get");
}

std::vector<Job> PostgresJobStore::claimed_in_order(const Result& result, const char* operation,
                                                    bool by_run_after) {
  std::vector<std::pair<std::int64_t, Job>> claimed;  // (seq, job): RETURNING has no order.
  for (int row = 0; row < result.rows(); ++row) {
    claimed.emplace_back(result.integer(row, kSeqColumn), read_job(result, row, operation));
  }
  if (by_run_after) {
    std::sort(claimed.begin(), claimed.end(), [](const auto& a, const auto& b) {
      return std::tie(a.second.run_after_ms, a.second.created_ms, a.first) <
             std::tie(b.second.run_after_ms, b.second.created_ms, b.first);
    });
  } else {
    std::sort(claimed.begin(), claimed.end(), [](const auto& a, const auto& b) {
      return std::tie(a.second.webhook_due_ms, a.first) <
             std::tie(b.second.webhook_due_ms, b.first);
    });
  }
  std::vector<Job> jobs;
  jobs.reserve(claimed.size());
  for (auto& entry : claimed) jobs.push_back(std::move(entry.second));
  return jobs;
}

void PostgresJobStore::reclaim_from_gone_nodes() {
  // A node's session lock lives as long as its connection: a lock this connection can take
  // belongs to a node whose process (or connection) is gone, so its leases end now.
  Params mine;
  mine.int4(node_);
  const Result nodes = run(kLeaseNodes, mine, "claim: find the nodes holding leases");
  for (int row = 0; row < nodes.rows(); ++row) {
    const auto node = static_cast<std::int32_t>(nodes.integer(row, 0));
    Params lock;
    lock.int4(postgresql_lock_class).int4(node);
    const Result locked = run(kTryNodeLock, lock, "claim: check a node");
    if (locked.rows() != 1 || locked.integer(0, 0) == 0) continue;  // Alive.
    std::int64_t expired = 0;
    try {
      Params which;
      which.int4(node);
      expired = run(kExpireNode, which, "claim: take over a gone node's leases").changed();
    } catch (...) {
      if (PQstatus(conn_) == CONNECTION_OK) {
        PQclear(PQexecPrepared(conn_, kNodeUnlock.name, 2, nullptr, nullptr, nullptr, 1));
      }
      throw;
    }
    run(kNodeUnlock, lock, "claim: release a node's lock");
    if (expired > 0) {
      spdlog::warn(
          "jobs: node {} is gone (its database session ended): its {} job(s) being sent are "
          "taken over now (a receiver may get such a mail twice, with the same Message-ID)",
          node, expired);
    }
  }
}

std::vector<Job> PostgresJobStore::claim(std::size_t max, std::int64_t now_ms,
                                         std::int64_t lease_ms) {
  return take_due(kClaim, "claim", max, now_ms, lease_ms);
}

std::vector<Job> PostgresJobStore::hold(std::size_t max, std::int64_t now_ms,
                                        std::int64_t lease_ms) {
  return take_due(kHold, "hold", max, now_ms, lease_ms);
}

std::vector<Job> PostgresJobStore::take_due(const StatementSpec& statement, const char* operation,
                                            std::size_t max, std::int64_t now_ms,
                                            std::int64_t lease_ms) {
  if (lease_ms <= 0) {
    throw std::invalid_argument(std::string("job store ") + operation +
                                ": lease_ms must be positive");
  }
  if (max == 0) return {};
  ensure_connected(operation);
  // A runner's hold shares the transaction of its outcomes: the check for gone nodes runs
  // inside it then (their session locks are not transactional; a rollback only undoes the
  // takeover, which the next check does again).
  if ((transaction_depth_ == 0 || &statement == &kHold) && steady_ms() >= next_gone_check_ms_) {
    next_gone_check_ms_ = steady_ms() + kDeadNodeCheckMs;
    reclaim_from_gone_nodes();
  }
  const auto limit = static_cast<std::int64_t>(std::min<std::size_t>(
      max, static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max())));
  Params params;
  params.int8(now_ms).int8(now_ms + lease_ms).int8(limit).int4(node_);
  // One statement: its own transaction unless the caller opened one.
  const Result result = run(statement, params, operation);
  return claimed_in_order(result, operation, true);
}

bool PostgresJobStore::start(std::string_view id, std::int64_t now_ms, std::int64_t lease_ms) {
  if (lease_ms <= 0) throw std::invalid_argument("job store start: lease_ms must be positive");
  ensure_connected("start");
  Params params;
  params.bytes(id).int8(now_ms).int8(now_ms + lease_ms).int4(node_);
  return run(kStart, params, "start").changed() > 0;
}

bool PostgresJobStore::mark_sent(std::string_view id, std::int64_t now_ms) {
  ensure_connected("mark_sent");
  Params params;
  params.bytes(id).int8(now_ms).boolean(webhooks_);
  return run(kMarkSent, params, "mark_sent").changed() > 0;
}

bool PostgresJobStore::mark_retry(std::string_view id, std::string_view error,
                                  std::int64_t run_after_ms, std::int64_t now_ms) {
  ensure_connected("mark_retry");
  Params params;
  params.bytes(id).bytes(error).int8(run_after_ms).int8(now_ms);
  return run(kMarkRetry, params, "mark_retry").changed() > 0;
}

bool PostgresJobStore::mark_failed(std::string_view id, std::string_view error,
                                   std::int64_t now_ms) {
  ensure_connected("mark_failed");
  Params params;
  params.bytes(id).int8(now_ms).boolean(webhooks_).bytes(error);
  return run(kMarkFailed, params, "mark_failed").changed() > 0;
}

bool PostgresJobStore::release(std::string_view id, std::int64_t now_ms) {
  Transaction transaction(*this, "release");
  Params params;
  params.bytes(id).int8(now_ms);
  const bool released = run(kRelease, params, "release").changed() > 0;
  // Another node may send it at once (this one is stopping).
  if (released) run(kNotify, Params{}, "release: notify");
  transaction.commit();
  return released;
}

std::int64_t PostgresJobStore::count_pending() {
  ensure_connected("count_pending");
  const Result result = run(kCountPending, Params{}, "count_pending");
  return result.rows() == 1 ? result.integer(0, 0) : 0;
}

std::vector<OwnerUsage> PostgresJobStore::pending_by_owner() {
  ensure_connected("pending_by_owner");
  const Result result = run(kPendingByOwner, Params{}, "pending_by_owner");
  std::vector<OwnerUsage> usage;
  for (int row = 0; row < result.rows(); ++row) {
    usage.push_back(
        OwnerUsage{result.bytes(row, 0), result.integer(row, 1), result.integer(row, 2)});
  }
  return usage;
}

StoreStats PostgresJobStore::stats(std::int64_t /*now_ms*/) {
  ensure_connected("stats");
  const Result result = run(kStats, Params{}, "stats");
  StoreStats stats;
  for (int row = 0; row < result.rows(); ++row) {
    const std::optional<JobState> state = parse_job_state(result.bytes(row, 0));
    if (!state) continue;
    stats.by_state[static_cast<std::size_t>(*state)] = result.integer(row, 1);
    const std::int64_t oldest = result.integer(row, 2);
    if (oldest > 0 && (stats.oldest_queued_ms == 0 || oldest < stats.oldest_queued_ms)) {
      stats.oldest_queued_ms = oldest;
    }
  }
  return stats;
}

void PostgresJobStore::transaction(const std::function<void()>& body) {
  Transaction transaction(*this, "transaction");
  body();
  transaction.commit();
}

std::size_t PostgresJobStore::purge_finished(std::int64_t finished_before_ms,
                                             std::size_t max_jobs) {
  if (max_jobs == 0) return 0;
  ensure_connected("purge");
  Params params;
  params.int8(finished_before_ms)
      .int8(static_cast<std::int64_t>(std::min<std::size_t>(
          max_jobs, static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max()))));
  return static_cast<std::size_t>(run(kPurge, params, "purge").changed());
}

std::int64_t PostgresJobStore::compact(std::int64_t /*max_pages*/) {
  // The server's autovacuum makes the space of deleted rows reusable; nothing is left here.
  return 0;
}

std::size_t PostgresJobStore::expire_all_leases(std::int64_t now_ms) {
  ensure_connected("expire_all_leases");
  Params params;
  params.int8(now_ms);
  Transaction transaction(*this, "expire_all_leases");
  const auto expired =
      static_cast<std::size_t>(run(kExpireLeases, params, "expire_all_leases").changed());
  run(kExpireHolds, params, "expire_all_leases: holds");
  transaction.commit();
  return expired;
}

void PostgresJobStore::probe_write(std::int64_t now_ms) {
  ensure_connected("probe_write");
  Params params;
  params.int8(now_ms);
  run(kProbe, params, "probe_write");
}

std::vector<Job> PostgresJobStore::claim_webhooks(std::size_t max, std::int64_t now_ms,
                                                  std::int64_t lease_ms) {
  if (lease_ms <= 0) {
    throw std::invalid_argument("job store claim_webhooks: lease_ms must be positive");
  }
  if (max == 0) return {};
  ensure_connected("claim_webhooks");
  const auto limit = static_cast<std::int64_t>(std::min<std::size_t>(
      max, static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max())));
  Params params;
  params.int8(now_ms).int8(now_ms + lease_ms).int8(limit);
  const Result result = run(kClaimWebhooks, params, "claim_webhooks");
  return claimed_in_order(result, "claim_webhooks", false);
}

bool PostgresJobStore::mark_webhook(std::string_view id, WebhookState state, std::int64_t due_ms,
                                    std::int64_t /*now_ms*/) {
  if (state == WebhookState::none) {
    throw std::invalid_argument("job store mark_webhook: the state must not be none");
  }
  ensure_connected("mark_webhook");
  Params params;
  params.bytes(id)
      .int4(static_cast<std::int32_t>(state))
      .int8(state == WebhookState::owed ? due_ms : 0);
  return run(kMarkWebhook, params, "mark_webhook").changed() > 0;
}

bool PostgresJobStore::release_webhook(std::string_view id, std::int64_t now_ms) {
  ensure_connected("release_webhook");
  Params params;
  params.bytes(id).int8(now_ms);
  return run(kReleaseWebhook, params, "release_webhook").changed() > 0;
}

std::int64_t PostgresJobStore::count_webhooks_owed() {
  ensure_connected("count_webhooks_owed");
  const Result result = run(kCountWebhooks, Params{}, "count_webhooks_owed");
  return result.rows() == 1 ? result.integer(0, 0) : 0;
}

}  // namespace

bool is_postgresql_url(std::string_view location) noexcept {
  return location.starts_with("postgresql://") || location.starts_with("postgres://");
}

std::string postgresql_display_url(std::string_view url) {
  // postgresql://user:password@host/db?password=...: the userinfo's password and any
  // password parameter are left out.
  std::string out(url);
  const std::size_t scheme = out.find("://");
  if (scheme != std::string::npos) {
    const std::size_t authority = scheme + 3;
    const std::size_t end = out.find_first_of("/?", authority);
    const std::size_t at =
        out.substr(authority, end == std::string::npos ? std::string::npos : end - authority)
            .rfind('@');
    if (at != std::string::npos) {
      const std::size_t colon = out.find(':', authority);
      if (colon != std::string::npos && colon < authority + at) {
        out.erase(colon, authority + at - colon);
      }
    }
  }
  for (const char* key : {"?password=", "&password="}) {
    const std::size_t found = out.find(key);
    if (found == std::string::npos) continue;
    const std::size_t value = found + std::strlen(key);
    const std::size_t end = out.find('&', value);
    out.replace(value, end == std::string::npos ? std::string::npos : end - value, "...");
  }
  return out;
}

std::unique_ptr<JobStore> open_postgresql_store(const std::string& url, bool synchronous_commit) {
  return std::make_unique<PostgresJobStore>(url, synchronous_commit);
}

JobNotifier::JobNotifier(std::string url, std::function<void()> on_jobs)
    : url_(std::move(url)), on_jobs_(std::move(on_jobs)) {
  stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0) {
    throw std::runtime_error(std::string("job notifier: eventfd: ") + std::strerror(errno));
  }
  thread_ = std::thread([this] { thread_main(); });
}

JobNotifier::~JobNotifier() {
  stop();
  ::close(stop_fd_);
}

void JobNotifier::stop() {
  const std::uint64_t one = 1;
  if (::write(stop_fd_, &one, sizeof one) < 0) {
    // The counter cannot overflow with a handful of writes; nothing else can fail here.
  }
  if (thread_.joinable()) thread_.join();
}

void JobNotifier::thread_main() {
  pthread_setname_np(pthread_self(), "squall-listen");  // Seen in top -H, ps -L, perf.
  const std::string display = postgresql_display_url(url_);
  std::int64_t backoff_ms = 0;
  bool reported = false;  // A failure was logged: log the recovery too.
  // Waits for the stop eventfd (true) or `timeout_ms` (false, -1 = none) or the socket `fd`.
  const auto wait = [this](int fd, int timeout_ms) {
    pollfd fds[2] = {{stop_fd_, POLLIN, 0}, {fd, POLLIN, 0}};
    const int count = fd >= 0 ? 2 : 1;
    while (::poll(fds, count, timeout_ms) < 0 && errno == EINTR) {
    }
    return (fds[0].revents & POLLIN) != 0;
  };
  for (;;) {
    PGconn* conn = connect(url_);
    std::string error;
    if (conn == nullptr || PQstatus(conn) != CONNECTION_OK) {
      error = conn != nullptr ? trimmed(PQerrorMessage(conn)) : "out of memory";
    } else {
      PGresult* listen = PQexec(conn, "LISTEN squall_jobs");
      if (PQresultStatus(listen) != PGRES_COMMAND_OK) error = trimmed(PQresultErrorMessage(listen));
      PQclear(listen);
    }
    if (error.empty()) {
      listening_.store(true, std::memory_order_release);
      if (reported) spdlog::info("jobs: listening for new jobs on {} again", display);
      reported = false;
      backoff_ms = 0;
      on_jobs_();  // What was inserted while nobody listened.
      for (;;) {
        if (wait(PQsocket(conn), -1)) {
          listening_.store(false, std::memory_order_release);
          PQfinish(conn);
          return;
        }
        if (PQconsumeInput(conn) == 0) {
          error = trimmed(PQerrorMessage(conn));
          break;
        }
        bool notified = false;
        while (PGnotify* notify = PQnotifies(conn)) {
          notified = true;
          PQfreemem(notify);
        }
        if (notified) on_jobs_();
      }
      listening_.store(false, std::memory_order_release);
    }
    PQfinish(conn);
    backoff_ms = backoff_ms == 0 ? kReconnectInitialMs : std::min(backoff_ms * 2, kReconnectMaxMs);
    if (!reported) {
      spdlog::error(
          "jobs: listening for new jobs on {} failed ({}); polling meanwhile, "
          "connecting again with backoff",
          display, error);
      reported = true;
    }
    if (wait(-1, static_cast<int>(backoff_ms))) return;
  }
}

}  // namespace squall::jobs

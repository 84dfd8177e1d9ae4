// The two JobStore implementations as test fixtures, so that one TEST_CASE_TEMPLATE holds both
// to the same semantics. Each fixture is a fresh, empty store: a file in a temporary directory
// (SQLite), or a schema of its own in the test server's database (PostgreSQL; dropped at the
// end). The PostgreSQL server is the private one `make unit` starts (scripts/pg-test-server
// sets SQUALL_TEST_PG_URL); without it the PostgreSQL variants say so and pass.
#pragma once

#include <doctest/doctest.h>
#include <libpq-fe.h>
#include <sqlite3.h>

#include <cstdlib>
#include <memory>
#include <random>
#include <string>

#include "squall/jobs/pg_store.hpp"
#include "squall/jobs/store.hpp"
#include "test_support.hpp"

namespace squall::testing {

class SqliteBackend {
 public:
  static constexpr const char* name = "sqlite";
  // An insert of a job whose kind is "boom" fails inside the database.
  static constexpr const char* boom_trigger =
      "CREATE TRIGGER boom BEFORE INSERT ON jobs WHEN NEW.kind = 'boom' "
      "BEGIN SELECT RAISE(ABORT, 'boom refused'); END";

  bool available() const { return true; }
  std::unique_ptr<jobs::JobStore> open(bool durable = false) const {
    return jobs::open_sqlite_store(location, durable);
  }
  // Runs SQL on the store through a connection of its own.
  void sql(const char* text) const {
    sqlite3* db = nullptr;
    REQUIRE(sqlite3_open(location.c_str(), &db) == SQLITE_OK);
    char* error = nullptr;
    const int status = sqlite3_exec(db, text, nullptr, nullptr, &error);
    INFO((error != nullptr ? error : ""));
    sqlite3_free(error);
    sqlite3_close(db);
    REQUIRE(status == SQLITE_OK);
  }
  // What the store's errors name.
  std::string named_in_errors() const { return location; }

  TempDir dir;                                 // Holds the file.
  std::string location = dir.file("jobs.db");  // The store's path.
};

class PostgresBackend {
 public:
  static constexpr const char* name = "postgresql";
  static constexpr const char* boom_trigger =
      "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.kind = "
      "'boom' THEN RAISE EXCEPTION 'boom refused'; END IF; RETURN NEW; END $$; "
      "CREATE TRIGGER boom BEFORE INSERT ON squall_jobs FOR EACH ROW EXECUTE FUNCTION boom()";

  static const char* server_url() { return std::getenv("SQUALL_TEST_PG_URL"); }

  PostgresBackend() {
    const char* url = server_url();
    if (url == nullptr || *url == '\0') return;
    std::random_device random;
    schema = "squall_test_" + std::to_string(random()) + "_" + std::to_string(random());
    const std::string base(url);
    location = base + (base.find('?') == std::string::npos ? "?" : "&") +
               "options=-csearch_path%3D" + schema;
    admin("CREATE SCHEMA " + schema, base);
  }
  ~PostgresBackend() {
    if (!schema.empty()) admin("DROP SCHEMA " + schema + " CASCADE", server_url(), false);
  }
  PostgresBackend(const PostgresBackend&) = delete;
  PostgresBackend& operator=(const PostgresBackend&) = delete;

  bool available() const { return !schema.empty(); }
  std::unique_ptr<jobs::JobStore> open(bool durable = false) const {
    return jobs::open_postgresql_store(location, durable);
  }
  void sql(const char* text) const { admin(text, location); }
  std::string named_in_errors() const { return jobs::postgresql_display_url(location); }

  // Runs `text` on a connection of its own to `url`.
  static void admin(const std::string& text, const std::string& url, bool require = true) {
    PGconn* conn = PQconnectdb(url.c_str());
    PQsetNoticeProcessor(
        conn, [](void*, const char*) {}, nullptr);  // DROP ... CASCADE talks.
    std::string error;
    if (PQstatus(conn) != CONNECTION_OK) {
      error = PQerrorMessage(conn);
    } else {
      PGresult* result = PQexec(conn, text.c_str());
      const ExecStatusType status = PQresultStatus(result);
      if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
        error = PQresultErrorMessage(result);
      }
      PQclear(result);
    }
    PQfinish(conn);
    if (require) {
      INFO(text << ": " << error);
      REQUIRE(error.empty());
    }
  }

  std::string schema;    // This fixture's schema; empty without a server.
  std::string location;  // The server's URL with this schema first in search_path.
};

}  // namespace squall::testing

// Ends a TEST_CASE_TEMPLATE for a backend that cannot run here (PostgreSQL without
// SQUALL_TEST_PG_URL), with a message saying so.
#define SQUALL_REQUIRE_BACKEND(backend)                                             \
  do {                                                                              \
    if (!(backend).available()) {                                                   \
      MESSAGE(                                                                      \
          "SQUALL_TEST_PG_URL is not set: the PostgreSQL store is not tested here " \
          "(make unit and make test start a private server and set it)");           \
      return;                                                                       \
    }                                                                               \
  } while (false)

// Tests for the config layer: the value parsers, the TOML loader, its error messages, and the
// shipped config/squalld.toml.
#include "server/config.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>

namespace squall::squalld {
namespace {

using namespace std::chrono_literals;

// The ConfigError message for a document, or "" when it loaded (which fails the test).
std::string load_error(std::string_view toml, const std::string& source = "test.toml") {
  try {
    load_config_string(toml, source);
  } catch (const ConfigError& e) {
    return e.what();
  }
  FAIL_CHECK("expected a ConfigError for:\n" << toml);
  return "";
}

template <typename Parse>
std::string invalid_argument_of(Parse parse, std::string_view text) {
  try {
    parse(text);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  FAIL_CHECK("expected std::invalid_argument for \"" << text << "\"");
  return "";
}

std::string duration_error(std::string_view text) {
  return invalid_argument_of([](std::string_view t) { return parse_duration(t); }, text);
}
std::string size_error(std::string_view text) {
  return invalid_argument_of([](std::string_view t) { return parse_size(t); }, text);
}
std::string address_error(std::string_view text) {
  return invalid_argument_of([](std::string_view t) { return parse_listen_address(t); }, text);
}

bool contains(const std::string& haystack, std::string_view needle) {
  return haystack.find(needle) != std::string::npos;
}

}  // namespace

TEST_CASE("defaults match the header") {
  const Config config;
  REQUIRE(config.server.listen.size() == 1);
  CHECK(config.server.listen[0].host == "127.0.0.1");
  CHECK(config.server.listen[0].port == 8080);
  CHECK(config.server.backlog == 511);
  CHECK(config.server.max_connections == 10000);
  CHECK(config.server.name == "squall");
  CHECK(config.limits.max_url_bytes == 8 * 1024);
  CHECK(config.limits.max_header_bytes == 16 * 1024);
  CHECK(config.limits.max_header_count == 100);
  CHECK(config.limits.max_body_bytes == 1024 * 1024);
  CHECK(config.limits.max_chunk_extension_bytes == 4 * 1024);
  CHECK(config.limits.write_buffer_high_water == 256 * 1024);
  CHECK(config.timeouts.header == 10s);
  CHECK(config.timeouts.body == 30s);
  CHECK(config.timeouts.keepalive == 75s);
  CHECK(config.timeouts.write == 30s);
  CHECK(config.timeouts.lingering == 2s);
  CHECK(config.timeouts.drain == 20s);
  CHECK(config.log.level == "info");
  CHECK(config.log.error_log == "stderr");
  CHECK(config.log.access_log == "stderr");
  CHECK(config.log.access_format == AccessLogFormat::combined);
  CHECK(config.loop.lag_interval == 250ms);
  CHECK(config.loop.blocking_threshold == 100ms);
  CHECK(config.routes.plaintext);
  CHECK(config.routes.healthz);
  CHECK(config.routes.metrics);
  CHECK(config.routes.echo);
}

TEST_CASE("an empty document, and empty tables, give the defaults") {
  CHECK(load_config_string("", "empty.toml") == Config{});
  CHECK(load_config_string("# nothing\n[server]\n[limits]\n[timeouts]\n[log]\n[loop]\n[routes]\n",
                           "tables.toml") == Config{});
}

TEST_CASE("every key is parsed") {
  const Config config = load_config_string(R"toml(
[server]
listen = ["0.0.0.0:80", "[::]:8443", "127.0.0.1:0"]
backlog = 1024
max_connections = 50000
name = "squall/1.0 (test)"

[limits]
max_url_bytes = "4KiB"
max_header_bytes = "32KiB"
max_header_count = 64
max_body_bytes = "10MiB"
max_chunk_extension_bytes = "512B"
write_buffer_high_water = "1MiB"

[timeouts]
header = "5s"
body = "1m"
keepalive = "2m"
write = "45s"
lingering = "500ms"
drain = "1h"

[log]
level = "debug"
error_log = "/var/log/squalld/error.log"
access_log = "off"
access_format = "json"

[loop]
lag_interval = "1s"
blocking_threshold = "50ms"

[routes]
plaintext = false
healthz = false
metrics = false
echo = false
)toml",
                                           "all.toml");
  REQUIRE(config.server.listen.size() == 3);
  CHECK(config.server.listen[0] == ListenAddress{"0.0.0.0", 80});
  CHECK(config.server.listen[1] == ListenAddress{"::", 8443});
  CHECK(config.server.listen[2] == ListenAddress{"127.0.0.1", 0});
  CHECK(config.server.backlog == 1024);
  CHECK(config.server.max_connections == 50000);
  CHECK(config.server.name == "squall/1.0 (test)");
  CHECK(config.limits.max_url_bytes == 4096);
  CHECK(config.limits.max_header_bytes == 32768);
  CHECK(config.limits.max_header_count == 64);
  CHECK(config.limits.max_body_bytes == 10 * 1024 * 1024);
  CHECK(config.limits.max_chunk_extension_bytes == 512);
  CHECK(config.limits.write_buffer_high_water == 1024 * 1024);
  CHECK(config.timeouts.header == 5s);
  CHECK(config.timeouts.body == 60s);
  CHECK(config.timeouts.keepalive == 120s);
  CHECK(config.timeouts.write == 45s);
  CHECK(config.timeouts.lingering == 500ms);
  CHECK(config.timeouts.drain == 3600s);
  CHECK(config.log.level == "debug");
  CHECK(config.log.error_log == "/var/log/squalld/error.log");
  CHECK(config.log.access_log == "off");
  CHECK(config.log.access_format == AccessLogFormat::json);
  CHECK(config.loop.lag_interval == 1s);
  CHECK(config.loop.blocking_threshold == 50ms);
  CHECK_FALSE(config.routes.plaintext);
  CHECK_FALSE(config.routes.healthz);
  CHECK_FALSE(config.routes.metrics);
  CHECK_FALSE(config.routes.echo);
}

TEST_CASE("missing keys keep their defaults") {
  const Config config = load_config_string("[timeouts]\nkeepalive = \"300s\"\n", "partial.toml");
  Config expected;
  expected.timeouts.keepalive = 300s;
  CHECK(config == expected);
}

TEST_CASE("[jobs] store takes a SQLite path or a PostgreSQL URL without a password") {
  CHECK(load_config_string("[jobs]\nstore = \"postgresql://squall@db.internal/squall\"\n", "t.toml")
            .jobs.store == "postgresql://squall@db.internal/squall");
  CHECK(load_config_string("[jobs]\nstore = \"postgres://db/j?passfile=/etc/squall/pgpass\"\n",
                           "t.toml")
            .jobs.store == "postgres://db/j?passfile=/etc/squall/pgpass");
  CHECK(load_config_string("[jobs]\nstore = \"/var/lib/squall/jobs.db\"\n", "t.toml").jobs.store ==
        "/var/lib/squall/jobs.db");
}

TEST_CASE("inline and dotted tables are the same tables") {
  const Config config = load_config_string(
      "server = { backlog = 7 }\nroutes.echo = false\n[limits]\nmax_header_count = 3\n", "x.toml");
  CHECK(config.server.backlog == 7);
  CHECK_FALSE(config.routes.echo);
  CHECK(config.limits.max_header_count == 3);
}

TEST_CASE("parse_duration accepts an integer and a unit") {
  CHECK(parse_duration("250ms") == 250ms);
  CHECK(parse_duration("10s") == 10s);
  CHECK(parse_duration("2m") == 120s);
  CHECK(parse_duration("1h") == 3600s);
  CHECK(parse_duration("7d") == 168h);
  CHECK(parse_duration("0s") == 0ms);  // Zero is a duration; the loader decides where it is wrong.
  CHECK(parse_duration("007s") == 7s);
  CHECK(parse_duration("9223372036854775807ms") == Duration::max());
}

TEST_CASE("parse_duration rejects everything else, saying why") {
  CHECK(duration_error("") == "expected a duration such as \"10s\", got \"\"");
  CHECK(duration_error("soon") == "expected a duration such as \"10s\", got \"soon\"");
  CHECK(contains(duration_error("10"), "missing unit; use ms, s, m, h or d"));
  CHECK(contains(duration_error("-5s"), "negative durations are not allowed"));
  CHECK(contains(duration_error("1.5s"), "fractions are not allowed"));
  CHECK(contains(duration_error("10x"), "unknown unit \"x\""));
  CHECK(contains(duration_error("10S"), "unknown unit \"S\""));
  CHECK(contains(duration_error("10 s"), "unknown unit \" s\""));
  CHECK(contains(duration_error("10sec"), "unknown unit \"sec\""));
  CHECK(contains(duration_error("1D"), "unknown unit \"D\""));
  CHECK(contains(duration_error("99999999999999999999s"), "too large"));
  CHECK(contains(duration_error("9223372036854775808ms"), "too large"));
  CHECK(contains(duration_error("2562047788016h"), "too large"));
  CHECK(duration_error("+5s") == "expected a duration such as \"10s\", got \"+5s\"");
  CHECK(duration_error(" 5s") == "expected a duration such as \"10s\", got \" 5s\"");
  CHECK(duration_error("s") == "expected a duration such as \"10s\", got \"s\"");
}

TEST_CASE("parse_size accepts an integer and a binary unit") {
  CHECK(parse_size("0") == 0);
  CHECK(parse_size("512") == 512);
  CHECK(parse_size("512B") == 512);
  CHECK(parse_size("16KiB") == 16 * 1024);
  CHECK(parse_size("1MiB") == 1024 * 1024);
  CHECK(parse_size("1GiB") == std::size_t{1} << 30);
  CHECK(parse_size("18446744073709551615") == std::numeric_limits<std::size_t>::max());
}

TEST_CASE("parse_size rejects everything else, saying why") {
  CHECK(size_error("lots") == "expected a size such as \"1MiB\", got \"lots\"");
  CHECK(size_error("") == "expected a size such as \"1MiB\", got \"\"");
  CHECK(contains(size_error("16KB"), "unknown unit \"KB\"; use B, KiB, MiB or GiB"));
  CHECK(contains(size_error("16k"), "unknown unit \"k\""));
  CHECK(contains(size_error("16kib"), "unknown unit \"kib\""));
  CHECK(contains(size_error("1 MiB"), "unknown unit \" MiB\""));
  CHECK(contains(size_error("1TiB"), "unknown unit \"TiB\""));
  CHECK(contains(size_error("1.5MiB"), "fractions are not allowed"));
  CHECK(contains(size_error("-1"), "negative sizes are not allowed"));
  CHECK(contains(size_error("-1KiB"), "negative sizes are not allowed"));
  CHECK(contains(size_error("18446744073709551616"), "too large"));
  CHECK(contains(size_error("17179869184GiB"), "too large"));  // 2^34 GiB = 2^64 bytes.
  CHECK(size_error("KiB") == "expected a size such as \"1MiB\", got \"KiB\"");
}

TEST_CASE("parse_listen_address accepts numeric IPv4 and bracketed IPv6") {
  CHECK(parse_listen_address("127.0.0.1:8080") == ListenAddress{"127.0.0.1", 8080});
  CHECK(parse_listen_address("0.0.0.0:80") == ListenAddress{"0.0.0.0", 80});
  CHECK(parse_listen_address("[::1]:8080") == ListenAddress{"::1", 8080});
  CHECK(parse_listen_address("[::]:443") == ListenAddress{"::", 443});
  CHECK(parse_listen_address("[2001:db8::1]:65535") == ListenAddress{"2001:db8::1", 65535});
  CHECK(parse_listen_address("[::ffff:127.0.0.1]:1") == ListenAddress{"::ffff:127.0.0.1", 1});
  CHECK(parse_listen_address("127.0.0.1:0") == ListenAddress{"127.0.0.1", 0});
  CHECK(parse_listen_address("[::1]:0") == ListenAddress{"::1", 0});
}

TEST_CASE("ListenAddress::text writes what parse_listen_address reads") {
  CHECK(ListenAddress{"127.0.0.1", 8080}.text() == "127.0.0.1:8080");
  CHECK(ListenAddress{"::1", 8080}.text() == "[::1]:8080");
  CHECK(ListenAddress{"::", 0}.text() == "[::]:0");
  for (const char* text : {"10.1.2.3:9", "[fe80::1]:80", "[::]:0"}) {
    CHECK(parse_listen_address(text).text() == text);
  }
}

TEST_CASE("parse_listen_address rejects bad addresses, saying why") {
  CHECK(contains(address_error("localhost:8080"), "\"localhost\" is not a numeric IPv4 address"));
  CHECK(contains(address_error("::1:8080"), "IPv6 addresses must be in brackets"));
  CHECK(contains(address_error("::1"), "IPv6 addresses must be in brackets"));
  CHECK(contains(address_error("[::1]"), "expected \":PORT\" after ']'"));
  CHECK(contains(address_error("[::1]8080"), "expected \":PORT\" after ']'"));
  CHECK(contains(address_error("[::1:8080"), "missing ']'"));
  CHECK(contains(address_error("[127.0.0.1]:80"), "brackets are only for IPv6 addresses"));
  CHECK(contains(address_error("[fe80::1%eth0]:80"), "is not a numeric IPv6 address"));
  CHECK(contains(address_error("[]:80"), "missing host"));
  CHECK(contains(address_error(":8080"), "missing host"));
  CHECK(contains(address_error("127.0.0.1"), "expected HOST:PORT"));
  CHECK(contains(address_error("8080"), "expected HOST:PORT"));
  CHECK(contains(address_error("127.0.0.1:"), "missing port"));
  CHECK(contains(address_error("127.0.0.1:65536"), "port 65536 is not in 0-65535"));
  CHECK(contains(address_error("127.0.0.1:99999999999999999999999"), "is not in 0-65535"));
  CHECK(contains(address_error("127.0.0.1:http"), "port \"http\" is not a number"));
  CHECK(contains(address_error("127.0.0.1:-1"), "port \"-1\" is not a number"));
  CHECK(contains(address_error("256.0.0.1:80"), "is not a numeric IPv4 address"));
  CHECK(contains(address_error("127.1:80"), "is not a numeric IPv4 address"));
  CHECK(contains(address_error(" 127.0.0.1:80"), "contains a space or control character"));
  CHECK(contains(address_error(std::string_view("127.0.0.1\0:80", 13)),
                 "contains a space or control character"));
  CHECK(address_error("") ==
        "expected an address such as \"127.0.0.1:8080\" or \"[::1]:8080\", got \"\"");
}

TEST_CASE("the message format names source, line, table, key and value") {
  // max_body_bytes is on line 12.
  const std::string toml =
      "# squalld\n"
      "\n"
      "[server]\n"
      "listen = [\"127.0.0.1:8080\"]\n"
      "\n"
      "[limits]\n"
      "max_url_bytes = \"8KiB\"\n"
      "max_header_bytes = \"16KiB\"\n"
      "max_header_count = 100\n"
      "\n"
      "# The body limit:\n"
      "max_body_bytes = \"lots\"\n";
  CHECK(load_error(toml, "squalld.toml") ==
        "squalld.toml:12: [limits] max_body_bytes: expected a size such as \"1MiB\", got \"lots\"");
}

TEST_CASE("unknown tables and keys are errors naming them and their line") {
  CHECK(load_error("[server]\nlisten = [\"127.0.0.1:1\"]\nlisten_address = \"x\"\n") ==
        "test.toml:3: [server] listen_address: unknown key; expected one of listen, backlog, "
        "max_connections, name, user, group, thread_pool_size, workers");
  CHECK(load_error("\n[limit]\nmax_body_bytes = \"1MiB\"\n") ==
        "test.toml:2: limit: unknown table; expected one of [server], [limits], [timeouts], "
        "[log], [loop], [routes], [smtp], [jobs], [auth], [policy], [quota], [webhooks]");
  CHECK(load_error("debug = true\n") ==
        "test.toml:1: debug: unknown key outside any table; settings belong in a table such as "
        "[server]");
  // A sub-table of a known table is an unknown key of it.
  CHECK(contains(load_error("[server]\n[server.tls]\ncert = \"x\"\n"),
                 "test.toml:2: [server] tls: unknown key"));
  CHECK(contains(load_error("[timeouts]\n\n\nidle = \"5s\"\n"),
                 "test.toml:4: [timeouts] idle: unknown key"));
  CHECK(contains(load_error("[routes]\n\"odd key\" = true\n"),
                 "test.toml:2: [routes] \"odd key\": unknown key"));
}

TEST_CASE("wrong types are errors naming the key, line and what was found") {
  CHECK(load_error("[timeouts]\nheader = 10\n") ==
        "test.toml:2: [timeouts] header: expected a duration such as \"10s\", got integer 10");
  CHECK(load_error("[limits]\nmax_body_bytes = 1048576\n") ==
        "test.toml:2: [limits] max_body_bytes: expected a size such as \"1MiB\", got integer "
        "1048576");
  CHECK(load_error("[server]\nbacklog = \"511\"\n") ==
        "test.toml:2: [server] backlog: expected an integer from 1 to 2147483647, got \"511\"");
  CHECK(contains(load_error("[server]\nmax_connections = 1.5\n"),
                 "test.toml:2: [server] max_connections: expected an integer from 1 to "
                 "9223372036854775807, got float 1.5"));
  CHECK(load_error("[routes]\necho = \"yes\"\n") ==
        "test.toml:2: [routes] echo: expected true or false, got \"yes\"");
  CHECK(load_error("[server]\nname = 5\n") ==
        "test.toml:2: [server] name: expected a string, got integer 5");
  CHECK(contains(load_error("[server]\nlisten = \"127.0.0.1:8080\"\n"),
                 "test.toml:2: [server] listen: expected an array of addresses"));
  CHECK(contains(load_error("[server]\nlisten = [8080]\n"),
                 "test.toml:2: [server] listen: expected an address such as \"127.0.0.1:8080\", "
                 "got integer 8080"));
  CHECK(contains(load_error("[log]\nlevel = true\n"),
                 "test.toml:2: [log] level: expected one of \"trace\""));
  CHECK(contains(load_error("[log]\naccess_log = [\"stderr\"]\n"),
                 "test.toml:2: [log] access_log: expected \"stderr\", \"off\" or a path, got an "
                 "array"));
  CHECK(load_error("server = 5\n") ==
        "test.toml:1: server: expected a table [server], got integer 5");
  CHECK(contains(load_error("[[server]]\nbacklog = 1\n"), "server: expected a table [server]"));
  CHECK(contains(load_error("[loop]\nlag_interval = 1979-05-27\n"),
                 "[loop] lag_interval: expected a duration such as \"10s\", got a date"));
}

TEST_CASE("value errors carry the parser's reason") {
  CHECK(load_error("[timeouts]\nbody = \"1.5s\"\n") ==
        "test.toml:2: [timeouts] body: expected a duration such as \"10s\", got \"1.5s\": "
        "fractions are not allowed; use a smaller unit, e.g. \"1500ms\"");
  CHECK(load_error("[limits]\nmax_body_bytes = \"2MB\"\n") ==
        "test.toml:2: [limits] max_body_bytes: expected a size such as \"1MiB\", got \"2MB\": "
        "unknown unit \"MB\"; use B, KiB, MiB or GiB");
}

TEST_CASE("a TOML syntax error gives toml++'s description with line and column") {
  const std::string message = load_error("[server]\nbacklog = \n");
  CHECK(contains(message, "test.toml:2:"));
  CHECK(contains(message, "TOML syntax error"));
  CHECK(contains(message, "expected value"));
  CHECK(contains(load_error("[server]\nbacklog = 1\nbacklog = 2\n"), "test.toml:3:"));
  CHECK(contains(load_error("[server\n"), "test.toml:1:"));
  CHECK(contains(load_error("[server]\nbacklog = 99999999999999999999\n"), "test.toml:2:"));
}

TEST_CASE("errors are reported in document order") {
  // Tables and keys come out of toml++ sorted by name; the first mistake in the file wins.
  CHECK(contains(load_error("[timeouts]\nzzz = 1\nbody = 1\n"), "test.toml:2: [timeouts] zzz:"));
  CHECK(contains(load_error("[timeouts]\nbody = 1\nzzz = 1\n"), "test.toml:2: [timeouts] body:"));
  CHECK(contains(load_error("[zzz]\n[aaa]\n"), "test.toml:1: zzz: unknown table"));
}

TEST_CASE("listen addresses are validated as a list") {
  CHECK(load_error("[server]\nlisten = []\n") ==
        "test.toml:2: [server] listen: at least one listen address is required");
  CHECK(load_error("[server]\nlisten = [\n  \"127.0.0.1:80\",\n  \"[::1]:80\",\n  "
                   "\"127.0.0.1:80\",\n]\n") ==
        "test.toml:5: [server] listen: \"127.0.0.1:80\" is listed twice (first on line 3)");
  // The same IPv6 address spelled two ways is still a duplicate.
  CHECK(contains(load_error("[server]\nlisten = [\"[::1]:80\", \"[0:0:0:0:0:0:0:1]:80\"]\n"),
                 "is listed twice"));
  // An element's error points at the element's own line.
  CHECK(contains(load_error("[server]\nlisten = [\n  \"127.0.0.1:80\",\n  \"localhost:80\",\n]\n"),
                 "test.toml:4: [server] listen: expected an address such as \"127.0.0.1:8080\" "
                 "or \"[::1]:8080\", got \"localhost:80\": \"localhost\" is not a numeric IPv4"));
  // Same host, different ports, and repeated port 0 (a fresh port each time) are fine.
  const Config config = load_config_string(
      "[server]\nlisten = [\"127.0.0.1:80\", \"127.0.0.1:81\", \"[::1]:0\", \"[::1]:0\"]\n",
      "ok.toml");
  CHECK(config.server.listen.size() == 4);
}

TEST_CASE("limits are checked against what the parser and writer need") {
  CHECK(load_error("[limits]\nmax_header_bytes = \"512\"\n") ==
        "test.toml:2: [limits] max_header_bytes: must be at least 1KiB, got \"512\"");
  CHECK(
      load_config_string("[limits]\nmax_header_bytes = \"1KiB\"\n", "x").limits.max_header_bytes ==
      1024);
  CHECK(
      load_config_string("[limits]\nmax_header_bytes = \"1MiB\"\n", "x").limits.max_header_bytes ==
      1024 * 1024);
  CHECK(contains(load_error("[limits]\nmax_header_bytes = \"1025KiB\"\n"),
                 "test.toml:2: [limits] max_header_bytes: must be at most 1MiB"));
  CHECK(contains(load_error("[limits]\nmax_url_bytes = \"2MiB\"\n"),
                 "test.toml:2: [limits] max_url_bytes: must be at most 1MiB"));
  CHECK(contains(load_error("[limits]\nmax_url_bytes = \"0\"\n"),
                 "[limits] max_url_bytes: must be at least 1B"));
  CHECK(load_error("[limits]\nwrite_buffer_high_water = \"4095\"\n") ==
        "test.toml:2: [limits] write_buffer_high_water: must be at least 4KiB, got \"4095\"");
  CHECK(load_config_string("[limits]\nwrite_buffer_high_water = \"4KiB\"\n", "x")
            .limits.write_buffer_high_water == 4096);
  // Zero means "refuse any" for these two.
  const Config zero = load_config_string(
      "[limits]\nmax_body_bytes = \"0\"\nmax_chunk_extension_bytes = \"0B\"\n", "x");
  CHECK(zero.limits.max_body_bytes == 0);
  CHECK(zero.limits.max_chunk_extension_bytes == 0);
}

TEST_CASE("max_body_bytes is capped and must fit the server-wide body budget") {
  // "64GiB" used to load, and one request then reserved it inside a parser callback.
  CHECK(load_error("[limits]\nmax_body_bytes = \"64GiB\"\n") ==
        "test.toml:2: [limits] max_body_bytes: must be at most 1GiB (a request body is held in "
        "memory whole), got \"64GiB\"");
  CHECK(load_error("[limits]\nmax_body_bytes = \"1025MiB\"\n")
            .starts_with("test.toml:2: [limits] max_body_bytes: must be at most 1GiB"));
  const Config largest = load_config_string(
      "[limits]\nmax_body_bytes = \"1GiB\"\nmax_buffered_body_bytes = \"2GiB\"\n", "x");
  CHECK(largest.limits.max_body_bytes == std::size_t{1} << 30);
  CHECK(largest.limits.max_buffered_body_bytes == std::size_t{2} << 30);
  CHECK(load_error("[limits]\nmax_buffered_body_bytes = \"1MiB\"\nmax_body_bytes = \"2MiB\"\n") ==
        "test.toml:3: [limits] max_body_bytes: max_body_bytes (2MiB) must not exceed "
        "max_buffered_body_bytes (1MiB)");
  CHECK(load_error("[limits]\nmax_buffered_body_bytes = \"512KiB\"\n") ==
        "test.toml:2: [limits] max_buffered_body_bytes: max_body_bytes (1MiB) must not exceed "
        "max_buffered_body_bytes (512KiB)");
  CHECK(load_error("[limits]\nmax_buffered_body_bytes = \"1KiB\"\n") ==
        "test.toml:2: [limits] max_buffered_body_bytes: must be at least 64KiB, got \"1KiB\"");
  CHECK(load_error("[limits]\nmax_unsent_bytes = \"4KiB\"\n") ==
        "test.toml:2: [limits] max_unsent_bytes: must be at least 64KiB, got \"4KiB\"");
  CHECK(
      load_config_string("[limits]\nmax_unsent_bytes = \"8MiB\"\n", "x").limits.max_unsent_bytes ==
      8 * 1024 * 1024);
}

TEST_CASE("counts must be positive and in range") {
  CHECK(load_error("[server]\nbacklog = 0\n") ==
        "test.toml:2: [server] backlog: expected an integer from 1 to 2147483647, got integer 0");
  CHECK(contains(load_error("[server]\nbacklog = -1\n"), "got integer -1"));
  CHECK(contains(load_error("[server]\nbacklog = 2147483648\n"), "[server] backlog: expected"));
  CHECK(load_config_string("[server]\nbacklog = 2147483647\n", "x").server.backlog ==
        std::numeric_limits<int>::max());
  CHECK(contains(load_error("[server]\nmax_connections = 0\n"), "[server] max_connections:"));
  CHECK(contains(load_error("[limits]\nmax_header_count = -5\n"), "[limits] max_header_count:"));
}

TEST_CASE("durations must be positive and at most a day") {
  for (const char* key : {"header", "body", "keepalive", "write", "lingering", "drain"}) {
    CAPTURE(key);
    CHECK(load_error(std::string("[timeouts]\n") + key + " = \"0s\"\n") ==
          std::string("test.toml:2: [timeouts] ") + key +
              ": must be greater than zero, got \"0s\"");
  }
  CHECK(contains(load_error("[loop]\nlag_interval = \"0ms\"\n"), "[loop] lag_interval: must be"));
  CHECK(contains(load_error("[loop]\nblocking_threshold = \"0ms\"\n"),
                 "[loop] blocking_threshold: must be"));
  CHECK(load_error("[timeouts]\ndrain = \"25h\"\n") ==
        "test.toml:2: [timeouts] drain: must be at most 24h, got \"25h\"");
  CHECK(load_config_string("[timeouts]\ndrain = \"24h\"\n", "x").timeouts.drain == 24h);
  CHECK(load_error("[timeouts]\ndrain = \"2d\"\n") ==
        "test.toml:2: [timeouts] drain: must be at most 24h, got \"2d\"");
  CHECK(contains(load_error("[timeouts]\nheader = \"-1s\"\n"), "negative durations"));
  CHECK(contains(load_error("[timeouts]\nheader = \"10\"\n"), "missing unit"));
  CHECK(contains(load_error("[timeouts]\nheader = \"999999999999999999999h\"\n"), "too large"));
}

TEST_CASE("log settings are checked") {
  for (const char* level : {"trace", "debug", "info", "warn", "error", "critical", "off"}) {
    CAPTURE(level);
    CHECK(load_config_string(std::string("[log]\nlevel = \"") + level + "\"\n", "x").log.level ==
          level);
  }
  CHECK(load_error("[log]\nlevel = \"verbose\"\n") ==
        "test.toml:2: [log] level: expected one of \"trace\", \"debug\", \"info\", \"warn\", "
        "\"error\", \"critical\", \"off\", got \"verbose\"");
  CHECK(contains(load_error("[log]\nlevel = \"INFO\"\n"), "got \"INFO\""));
  CHECK(load_error("[log]\naccess_format = \"common\"\n") ==
        "test.toml:2: [log] access_format: expected \"combined\" or \"json\", got \"common\"");
  CHECK(contains(load_error("[log]\nerror_log = \"off\"\n"),
                 "test.toml:2: [log] error_log: the error log cannot be turned off"));
  CHECK(contains(load_error("[log]\naccess_log = \"\"\n"), "[log] access_log: expected"));
  CHECK(contains(load_error("[log]\nerror_log = \"\"\n"), "[log] error_log: expected"));
  CHECK(contains(load_error("[log]\naccess_log = \"/tmp/a\\u0000b\"\n"), "NUL"));
  CHECK(load_config_string("[log]\naccess_log = \"stderr\"\nerror_log = \"logs/e.log\"\n", "x")
            .log.error_log == "logs/e.log");
}

TEST_CASE("the server name must be a valid header value") {
  CHECK(contains(load_error("[server]\nname = \"squall\\r\\nX-Evil: 1\"\n"),
                 "test.toml:2: [server] name: expected printable ASCII"));
  CHECK(contains(load_error("[server]\nname = \"\"\n"), "[server] name:"));
  CHECK(contains(load_error("[server]\nname = \" squall\"\n"), "[server] name:"));
  CHECK(contains(load_error("[server]\nname = \"sqüall\"\n"), "[server] name:"));
  CHECK(contains(load_error("[server]\nname = \"" + std::string(300, 'a') + "\"\n"),
                 "[server] name:"));
}

TEST_CASE("load_config_file reads a file and reports what went wrong") {
  CHECK_THROWS_WITH_AS(load_config_file("/nonexistent/squalld.toml"),
                       "/nonexistent/squalld.toml: cannot open: No such file or directory",
                       ConfigError);
  CHECK_THROWS_WITH_AS(load_config_file("/"), "/: cannot read: Is a directory", ConfigError);
}

TEST_CASE("the shipped config/squalld.toml loads and holds exactly the defaults") {
  const Config config = load_config_file("config/squalld.toml");
  CHECK(config == Config{});
}

}  // namespace squall::squalld

TEST_CASE("[smtp] and [jobs] keys load and are checked against each other") {
  const squall::squalld::Config config = squall::squalld::load_config_string(R"(
[server]
thread_pool_size = 8
user = "squall"
[smtp]
url = "smtps://mail.example.test:465"
starttls = "required"
username = "robot"
password_env = "SQUALL_SMTP_PASSWORD"
from = "noreply@example.test"
timeout = "30s"
[jobs]
store = "/var/lib/squall/jobs.db"
durability = "normal"
max_concurrent_sends = 4
retry_initial = "1s"
retry_max = "10s"
max_email_bytes = "64KiB"
[routes]
email = false
)",
                                                                             "t.toml");
  CHECK(config.server.thread_pool_size == 8);
  CHECK(config.server.user == "squall");
  CHECK(config.smtp.url == "smtps://mail.example.test:465");
  CHECK(config.smtp.starttls == squall::mail::SmtpSettings::StartTls::required);
  CHECK(config.smtp.password_env == "SQUALL_SMTP_PASSWORD");
  CHECK(config.smtp.timeout == squall::squalld::Duration(30'000));
  CHECK(config.jobs.durability == squall::squalld::Durability::normal);
  CHECK(config.jobs.max_concurrent == 4);
  CHECK(config.jobs.max_email_bytes == 64 * 1024);
  CHECK_FALSE(config.routes.email);
  CHECK(config.routes.jobs);
}

TEST_CASE("sends must leave libuv's pool a thread; errors name the key and line") {
  const auto message = [](const char* text) {
    try {
      squall::squalld::load_config_string(text, "t.toml");
    } catch (const squall::squalld::ConfigError& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  };
  CHECK(message("[jobs]\nmax_concurrent_sends = 4\n") ==
        "t.toml:2: [jobs] max_concurrent_sends: max_concurrent_sends (4) must be below [server] "
        "thread_pool_size (4): libuv's file and DNS work shares the pool");
  CHECK(message("[smtp]\nurl = \"http://x\"\n").rfind("t.toml:2: [smtp] url: expected a URL", 0) ==
        0);
  CHECK(message("[smtp]\nstarttls = \"maybe\"\n").rfind("t.toml:2: [smtp] starttls:", 0) == 0);
  CHECK(message("[smtp]\npassword_file = \"/p\"\npassword_env = \"P\"\n") ==
        "t.toml:3: [smtp] password_env: set password_file or password_env, not both");
  CHECK(message("[jobs]\nretry_initial = \"2m\"\nretry_max = \"1m\"\n") ==
        "t.toml:3: [jobs] retry_max: retry_max must not be below retry_initial");
  CHECK(message("[jobs]\nstore = \"\"\n") == "t.toml:2: [jobs] store: must not be empty");
  CHECK(message("[jobs]\nstore = \"postgresql://ann:secret@db/jobs\"\n")
            .rfind("t.toml:2: [jobs] store: the URL contains a password; put it in", 0) == 0);
  CHECK(message("[jobs]\nstore = \"postgres://db/jobs?sslmode=require&password=x\"\n")
            .rfind("t.toml:2: [jobs] store: the URL contains a password", 0) == 0);
  CHECK(message("[smtp]\ntimeout = \"30s\"\n[jobs]\nlease = \"30s\"\n") ==
        "t.toml:4: [jobs] lease: lease (30000 ms) must be longer than [smtp] connect_timeout + "
        "timeout (40000 ms), or a send still running would be claimed again");
  CHECK(message("[jobs]\nbogus = 1\n").rfind("t.toml:2: [jobs] bogus: unknown key", 0) == 0);
}

TEST_CASE("[jobs] retain takes days, up to ten years") {
  CHECK(squall::squalld::Config{}.jobs.retain == std::chrono::hours(24 * 7));
  CHECK(squall::squalld::load_config_string("[jobs]\nretain = \"30d\"\n", "t.toml").jobs.retain ==
        std::chrono::hours(24 * 30));
  CHECK(squall::squalld::load_config_string("[jobs]\nretain = \"90s\"\n", "t.toml").jobs.retain ==
        std::chrono::seconds(90));
  try {
    squall::squalld::load_config_string("[jobs]\nretain = \"3651d\"\n", "t.toml");
    FAIL("no error");
  } catch (const squall::squalld::ConfigError& error) {
    CHECK(std::string(error.what()) ==
          "t.toml:2: [jobs] retain: must be at most 87600h, got \"3651d\"");
  }
}

TEST_CASE("an SMTP username needs smtps:// or starttls = required; TLS keys load") {
  const auto message = [](const char* text) {
    try {
      squall::squalld::load_config_string(text, "t.toml");
    } catch (const squall::squalld::ConfigError& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  };
  const std::string expected =
      ": [smtp] username: a username needs an encrypted connection, or the password goes in "
      "clear text: use an smtps:// url or starttls = \"required\"";
  CHECK(message("[smtp]\nurl = \"smtp://relay:587\"\nusername = \"robot\"\n") ==
        "t.toml:3" + expected);
  CHECK(message("[smtp]\nusername = \"robot\"\nstarttls = \"off\"\n") == "t.toml:2" + expected);
  CHECK(message("[smtp]\nusername = \"robot\"\nstarttls = \"required\"\n") == "no error");
  CHECK(message("[smtp]\nusername = \"robot\"\nurl = \"smtps://relay:465\"\n") == "no error");
  const squall::squalld::Config config = squall::squalld::load_config_string(
      "[smtp]\nca_file = \"/etc/squall/relay-ca.pem\"\ntls_verify = false\n", "t.toml");
  CHECK(config.smtp.ca_file == "/etc/squall/relay-ca.pem");
  CHECK_FALSE(config.smtp.tls_verify);
  CHECK(squall::squalld::Config{}.smtp.tls_verify);
}
namespace squall::squalld {

TEST_CASE("[auth], [policy] and [quota] load, and their mistakes name key and line") {
  const Config config = load_config_string(
      "[auth]\ntokens_file = \"/etc/squall/tokens\"\nanonymous = true\nhealthz = \"loopback\"\n"
      "metrics = \"token\"\necho = \"open\"\n"
      "[policy]\nrecipient_domains = [\"Example.COM\", \"example.org\"]\n"
      "blocked_recipient_domains = [\"bad.example.com\"]\nip_literal_recipients = true\n"
      "[quota]\ntoken_per_minute = 60\ntoken_burst = 5\naddress_per_minute = 120\n"
      "address_burst = 10\nmax_queued_per_client = 7\n"
      "[jobs]\nmax_queued_bytes = \"64MiB\"\n",
      "test.toml");
  CHECK(config.auth.tokens_file == "/etc/squall/tokens");
  CHECK(config.auth.anonymous);
  CHECK(config.auth.healthz == RouteAccess::loopback);
  CHECK(config.auth.metrics == RouteAccess::token);
  CHECK(config.auth.echo == RouteAccess::open);
  CHECK(config.policy.recipient_domains == std::vector<std::string>{"example.com", "example.org"});
  CHECK(config.policy.blocked_recipient_domains == std::vector<std::string>{"bad.example.com"});
  CHECK(config.policy.ip_literal_recipients);
  CHECK(config.quota.token_per_minute == 60);
  CHECK(config.quota.token_burst == 5);
  CHECK(config.quota.address_per_minute == 120);
  CHECK(config.quota.address_burst == 10);
  CHECK(config.quota.max_queued_per_client == 7);
  CHECK(config.jobs.max_queued_bytes == 64 * 1024 * 1024);

  CHECK(load_error("[auth]\nmetrics = \"public\"\n") ==
        "test.toml:2: [auth] metrics: expected \"open\", \"loopback\", \"token\" or "
        "\"loopback-or-token\", got \"public\"");
  CHECK(load_error("[policy]\nrecipient_domains = [\n  \"ok.example\",\n  \"a b\"]\n") ==
        "test.toml:4: [policy] recipient_domains: expected a domain of letters, digits, hyphens "
        "and dots such as \"example.com\", got \"a b\"");
  CHECK(load_error("[policy]\nblocked_recipient_domains = \"x.com\"\n") ==
        "test.toml:2: [policy] blocked_recipient_domains: expected an array of domains such as "
        "[\"example.com\"], got \"x.com\"");
  CHECK(load_error("[quota]\ntoken_burst = 0\n") ==
        "test.toml:2: [quota] token_burst: expected an integer from 1 to 1000000, got integer 0");
  CHECK(load_error("[auth]\nanonymous = \"yes\"\n") ==
        "test.toml:2: [auth] anonymous: expected true or false, got \"yes\"");
}

TEST_CASE("[webhooks]: url, secret_file, timeout, max_attempts") {
  const squall::squalld::Config config = squall::squalld::load_config_string(
      "[webhooks]\nurl = \"https://hooks.example.com/squall\"\nsecret_file = \"hook.key\"\n"
      "timeout = \"3s\"\nmax_attempts = 4\n",
      "test.toml");
  CHECK(config.webhooks.url == "https://hooks.example.com/squall");
  CHECK(config.webhooks.secret_file == "hook.key");
  CHECK(config.webhooks.timeout == std::chrono::milliseconds(3000));
  CHECK(config.webhooks.max_attempts == 4);
  CHECK(squall::squalld::Config{}.webhooks.url.empty());  // Off by default.
  CHECK(load_error("[webhooks]\nurl = \"http://127.0.0.1:9/x\"\n") ==
        "test.toml:2: [webhooks] url: webhooks need [webhooks] secret_file (the key they are "
        "signed with)");
  CHECK(load_error("[webhooks]\n\nurl = \"ftp://example.com/x\"\nsecret_file = \"k\"\n")
            .starts_with("test.toml:3: [webhooks] url: expected \"\" (off) or a URL such as"));
  CHECK(load_error("[webhooks]\nurl = \"http:// spaced\"\nsecret_file = \"k\"\n")
            .starts_with("test.toml:2: [webhooks] url: expected"));
  CHECK(load_error("[webhooks]\nmax_attempts = 0\n")
            .starts_with("test.toml:2: [webhooks] "
                         "max_attempts:"));
}

TEST_CASE("[server] workers: a count from 1 to 256, or \"auto\" (0)") {
  CHECK(Config{}.server.workers == 1);
  CHECK(load_config_string("[server]\nworkers = 2\n", "x.toml").server.workers == 2);
  CHECK(load_config_string("[server]\nworkers = 256\n", "x.toml").server.workers == 256);
  CHECK(load_config_string("[server]\nworkers = \"auto\"\n", "x.toml").server.workers == 0);
  const std::string expected = "expected an integer from 1 to 256 or \"auto\", got ";
  CHECK(load_error("[server]\n\nworkers = 0\n") ==
        "test.toml:3: [server] workers: " + expected + "integer 0");
  CHECK(load_error("[server]\nworkers = -2\n") ==
        "test.toml:2: [server] workers: " + expected + "integer -2");
  CHECK(load_error("[server]\nworkers = 257\n") ==
        "test.toml:2: [server] workers: " + expected + "integer 257");
  CHECK(load_error("[server]\nworkers = 1.5\n") ==
        "test.toml:2: [server] workers: " + expected + "float 1.5");
  CHECK(load_error("[server]\nworkers = \"2\"\n") ==
        "test.toml:2: [server] workers: " + expected + "\"2\"");
  CHECK(load_error("[server]\nworkers = \"Auto\"\n") ==
        "test.toml:2: [server] workers: " + expected + "\"Auto\"");
}

}  // namespace squall::squalld

TEST_CASE("[smtp] connections and idle_timeout load; errors name the key and line") {
  CHECK(squall::squalld::Config{}.smtp.connections == 2);
  CHECK(squall::squalld::Config{}.smtp.idle_timeout == std::chrono::seconds(30));
  const auto config = squall::squalld::load_config_string(
      "[smtp]\nconnections = 8\nidle_timeout = \"250ms\"\n", "t.toml");
  CHECK(config.smtp.connections == 8);
  CHECK(config.smtp.idle_timeout == std::chrono::milliseconds(250));
  const auto message = [](const char* text) {
    try {
      squall::squalld::load_config_string(text, "t.toml");
    } catch (const squall::squalld::ConfigError& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  };
  CHECK(message("[smtp]\n\nconnections = 0\n") ==
        "t.toml:3: [smtp] connections: expected an integer from 1 to 1024, got integer 0");
  CHECK(message("[smtp]\nconnections = 1025\n") ==
        "t.toml:2: [smtp] connections: expected an integer from 1 to 1024, got integer 1025");
  CHECK(message("[smtp]\nconnections = \"4\"\n") ==
        "t.toml:2: [smtp] connections: expected an integer from 1 to 1024, got \"4\"");
  CHECK(message("[smtp]\nidle_timeout = \"0s\"\n") ==
        "t.toml:2: [smtp] idle_timeout: must be greater than zero, got \"0s\"");
}

// The daemon's configuration: a TOML file turned into typed values, validated as a whole.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "squall/http/limits.hpp"
#include "squall/jobs/runner.hpp"
#include "squall/mail/email.hpp"
#include "squall/mail/smtp.hpp"

namespace squall::squalld {

using Duration = std::chrono::milliseconds;

// One address to listen on, as written in the config: "127.0.0.1:8080" or "[::1]:8080".
struct ListenAddress {
  std::string host;          // Numeric IPv4 or IPv6 address, without brackets.
  std::uint16_t port;        // 0 asks the kernel for a free port.
  std::string text() const;  // "127.0.0.1:8080", "[::1]:8080".
  bool operator==(const ListenAddress&) const = default;
};

// Parses "HOST:PORT" (IPv6 in brackets). Throws std::invalid_argument naming what was wrong.
ListenAddress parse_listen_address(std::string_view text);

// Parses "250ms", "10s", "2m", "1h", "7d" (an integer and a unit). Throws
// std::invalid_argument.
Duration parse_duration(std::string_view text);

// Parses "512", "512B", "16KiB", "1MiB", "1GiB" (an integer and a binary unit). Throws
// std::invalid_argument.
std::size_t parse_size(std::string_view text);

struct ServerConfig {
  std::vector<ListenAddress> listen{{"127.0.0.1", 8080}};  // [server] listen
  int backlog = 511;                                       // [server] backlog
  std::size_t max_connections = 10000;                     // [server] max_connections
  std::string name = "squall";                             // [server] name: the Server header
  std::string user;                  // [server] user: drop to it after binding ("" keeps root)
  std::string group;                 // [server] group: with user ("" = the user's group)
  std::size_t thread_pool_size = 4;  // [server] thread_pool_size: libuv's worker threads
  // [server] workers: event loops, each on its own thread with its own SO_REUSEPORT listening
  // socket; 0 stands for "auto" (the number of usable cores, sched_getaffinity).
  std::size_t workers = 1;
  bool operator==(const ServerConfig&) const = default;
};

// [limits]: the library's own bounds (http::Limits); each key is the field of the same name.
using LimitsConfig = http::Limits;

// [timeouts]: the connection's timeouts (http::Timeouts; each key is the field of the same name)
// and the daemon's own drain.
struct TimeoutsConfig : http::Timeouts {
  Duration drain{20'000};  // [timeouts] drain: how long SIGTERM waits for in-flight requests
  bool operator==(const TimeoutsConfig&) const = default;
};

enum class AccessLogFormat { combined, json };

struct LogConfig {
  std::string level = "info";         // [log] level: trace..critical, off
  std::string error_log = "stderr";   // [log] error_log: "stderr" or a path
  std::string access_log = "stderr";  // [log] access_log: "stderr", "off", path
  AccessLogFormat access_format = AccessLogFormat::combined;  // [log] access_format
  bool operator==(const LogConfig&) const = default;
};

struct LoopConfig {
  Duration lag_interval{250};        // [loop] lag_interval: how often loop lag is sampled
  Duration blocking_threshold{100};  // [loop] blocking_threshold: warn when a handler blocks
  bool operator==(const LoopConfig&) const = default;
};

struct RoutesConfig {
  bool plaintext = true;  // [routes] plaintext: GET /plaintext
  bool healthz = true;    // [routes] healthz: GET /healthz
  bool metrics = true;    // [routes] metrics: GET /metrics
  bool echo = true;       // [routes] echo: POST /echo
  bool email = true;      // [routes] email: POST /email
  bool jobs = true;       // [routes] jobs: GET /jobs/{id}
  bool operator==(const RoutesConfig&) const = default;
};

// [smtp]: the relay (mail::SmtpSettings: url, starttls, username, connect_timeout, timeout,
// ca_file, tls_verify, connections, idle_timeout; each key is the field of the same name) and what
// only squalld has. The password field is not a key: squalld fills it from password_file or
// password_env.
struct SmtpConfig : mail::SmtpSettings {
  std::string password_file;              // [smtp] password_file: a file holding it
  std::string password_env;               // [smtp] password_env: or an environment variable
  std::string from = "squall@localhost";  // [smtp] from: the default sender
  bool operator==(const SmtpConfig&) const = default;
};

enum class Durability { full, normal };

// [jobs]: the runner's options (jobs::RunnerOptions: max_attempts, retry_initial, retry_max,
// lease, poll_interval; max_concurrent is the key max_concurrent_sends), the POST /email bounds
// (mail::EmailLimits: max_recipients, max_email_bytes) and the queue's own settings.
struct JobsConfig : jobs::RunnerOptions, mail::EmailLimits {
  std::string store = "squall-jobs.db";      // [jobs] store: SQLite path or postgresql:// URL
  Durability durability = Durability::full;  // [jobs] durability: full (fsync per commit), normal
  std::size_t max_queued = 100000;           // [jobs] max_queued: beyond it POST /email is 503
  Duration retain{7 * 24 * 3'600'000};       // [jobs] retain: sent/failed jobs kept this long
  // [jobs] max_queued_bytes: stored payload bytes of waiting jobs beyond which POST /email is 503
  std::size_t max_queued_bytes = std::size_t{1024} * 1024 * 1024;
  bool operator==(const JobsConfig&) const = default;
};

// Who may call a route that is not a mail route: anyone, loopback clients only, callers with a
// valid API token only, or either of the last two.
enum class RouteAccess { open, loopback, token, loopback_or_token };

struct AuthConfig {
  std::string tokens_file;  // [auth] tokens_file: "NAME sha256:HEX [from=...]" lines ("" = none)
  bool anonymous = false;   // [auth] anonymous: mail routes without a token on a public address
  RouteAccess healthz = RouteAccess::open;               // [auth] healthz: GET /healthz
  RouteAccess metrics = RouteAccess::loopback_or_token;  // [auth] metrics: GET /metrics
  RouteAccess echo = RouteAccess::loopback_or_token;     // [auth] echo: POST /echo
  bool operator==(const AuthConfig&) const = default;
};

struct PolicyConfig {
  // [policy] recipient_domains: recipients must be in one of these domains or their subdomains
  // (empty = any domain)
  std::vector<std::string> recipient_domains;
  // [policy] blocked_recipient_domains: recipients in these domains (or subdomains) are refused
  std::vector<std::string> blocked_recipient_domains;
  bool ip_literal_recipients = false;  // [policy] ip_literal_recipients: allow "a@[192.0.2.1]"
  bool operator==(const PolicyConfig&) const = default;
};

struct QuotaConfig {
  std::size_t token_per_minute = 600;    // [quota] token_per_minute: POST /email per token
  std::size_t token_burst = 100;         // [quota] token_burst: POSTs a token may make at once
  std::size_t address_per_minute = 600;  // [quota] address_per_minute: POST /email per client IP
  std::size_t address_burst = 100;       // [quota] address_burst: POSTs an address may make at once
  std::size_t max_queued_per_client = 10000;  // [quota] max_queued_per_client: waiting jobs of
                                              // one token (or of all anonymous callers)
  bool operator==(const QuotaConfig&) const = default;
};

struct WebhooksConfig {
  std::string url;           // [webhooks] url: http(s) URL job outcomes are POSTed to ("" = off)
  std::string secret_file;   // [webhooks] secret_file: the HMAC key (owner-only file, first line)
  Duration timeout{10'000};  // [webhooks] timeout: one delivery attempt, connect included
  std::size_t max_attempts = 10;  // [webhooks] max_attempts: then the webhook is given up
  bool operator==(const WebhooksConfig&) const = default;
};

struct Config {
  ServerConfig server;
  LimitsConfig limits;
  TimeoutsConfig timeouts;
  LogConfig log;
  LoopConfig loop;
  RoutesConfig routes;
  SmtpConfig smtp;
  JobsConfig jobs;
  AuthConfig auth;
  PolicyConfig policy;
  QuotaConfig quota;
  WebhooksConfig webhooks;
  // Field by field; the shipped config file is tested against a default-constructed Config.
  bool operator==(const Config&) const = default;
};

// A configuration error: the message names the file, line, key and what was wrong, e.g.
// "squalld.toml:12: [limits] max_body_bytes: expected a size such as \"1MiB\", got \"lots\"".
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Reads and validates a TOML file. Unknown tables or keys and wrong types are errors.
// Throws ConfigError.
Config load_config_file(const std::string& path);

// The same, from text already in memory; `source_name` is used in error messages.
Config load_config_string(std::string_view toml_text, const std::string& source_name);

}  // namespace squall::squalld

// The daemon's configuration: a TOML file turned into typed values, validated as a whole.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace squall {

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

struct LimitsConfig {
  std::size_t max_url_bytes = 8 * 1024;              // [limits] max_url_bytes -> 414
  std::size_t max_header_bytes = 16 * 1024;          // [limits] max_header_bytes -> 431
  std::size_t max_header_count = 100;                // [limits] max_header_count -> 431
  std::size_t max_body_bytes = 1024 * 1024;          // [limits] max_body_bytes -> 413 (<= 1GiB)
  std::size_t max_chunk_extension_bytes = 4 * 1024;  // [limits] max_chunk_extension_bytes
  std::size_t write_buffer_high_water = 256 * 1024;  // [limits] write_buffer_high_water
  // [limits] max_buffered_body_bytes: request bodies held by all connections at once; a body
  // that would go past it gets 503 + Retry-After and the connection closes.
  std::size_t max_buffered_body_bytes = 64 * 1024 * 1024;
  // [limits] max_unsent_bytes: response bytes of all connections the clients have not read;
  // above it no connection takes a new request until it falls to half.
  std::size_t max_unsent_bytes = 64 * 1024 * 1024;
  bool operator==(const LimitsConfig&) const = default;
};

struct TimeoutsConfig {
  Duration header{10'000};     // [timeouts] header: first byte of a request (or the accept, for
                               // a connection's first byte) to its last header
  Duration body{30'000};       // [timeouts] body: end of a request's head to its body's last byte
  Duration keepalive{75'000};  // [timeouts] keepalive: idle time between requests
  Duration write{30'000};      // [timeouts] write: the longest a write may make no progress
  Duration lingering{2'000};   // [timeouts] lingering: reading after an early error response
  Duration drain{20'000};      // [timeouts] drain: how long SIGTERM waits for in-flight requests
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

enum class StartTls { off, opportunistic, required };

struct SmtpConfig {
  std::string url = "smtp://127.0.0.1:25";      // [smtp] url: smtp://host:port or smtps://
  StartTls starttls = StartTls::opportunistic;  // [smtp] starttls: off, opportunistic, required
  std::string username;                         // [smtp] username ("" = no authentication)
  std::string password_file;                    // [smtp] password_file: a file holding it
  std::string password_env;                     // [smtp] password_env: or an environment variable
  std::string from = "squall@localhost";        // [smtp] from: the default sender
  Duration connect_timeout{10'000};             // [smtp] connect_timeout
  Duration timeout{60'000};                     // [smtp] timeout: one whole SMTP exchange
  std::string ca_file;     // [smtp] ca_file: PEM CA certificates for the relay ("" = system's)
  bool tls_verify = true;  // [smtp] tls_verify: false skips certificate checks (logged loudly)
  bool operator==(const SmtpConfig&) const = default;
};

enum class Durability { full, normal };

struct JobsConfig {
  std::string store = "squall-jobs.db";       // [jobs] store: the SQLite database's path
  Durability durability = Durability::full;   // [jobs] durability: full (fsync per commit), normal
  std::size_t max_queued = 100000;            // [jobs] max_queued: beyond it POST /email is 503
  std::size_t max_concurrent_sends = 2;       // [jobs] max_concurrent_sends: < thread_pool_size
  std::size_t max_attempts = 8;               // [jobs] max_attempts: then the job has failed
  Duration retry_initial{30'000};             // [jobs] retry_initial: the first backoff
  Duration retry_max{3'600'000};              // [jobs] retry_max: the backoff's cap
  Duration lease{300'000};                    // [jobs] lease: a send's claim on its job
  Duration poll_interval{1'000};              // [jobs] poll_interval: how often due jobs are sought
  std::size_t max_recipients = 50;            // [jobs] max_recipients: to + cc + bcc
  std::size_t max_email_bytes = 1024 * 1024;  // [jobs] max_email_bytes: subject + text + html
  Duration retain{7 * 24 * 3'600'000};        // [jobs] retain: sent/failed jobs kept this long
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

}  // namespace squall

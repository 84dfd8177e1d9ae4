// The config loader: toml++ does the TOML syntax; everything after that is ours, so that every
// mistake in the file is reported with its line, table and key instead of being ignored.
#include "server/config.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <toml++/toml.h>

namespace squall::squalld {

namespace {

constexpr std::size_t kKiB = 1024;
constexpr std::size_t kMiB = 1024 * kKiB;
constexpr std::size_t kGiB = 1024 * kMiB;

// The parser keeps the request line and the headers in one read buffer, so each limit is capped
// to keep that buffer a sane size.
constexpr std::size_t kMaxUrlOrHeaderBytes = 1 * kMiB;
// Below this a browser's ordinary headers (cookies, user agent) would already be refused.
constexpr std::size_t kMinHeaderBytes = 1 * kKiB;
// Smaller high-water marks would stall writers on every response.
constexpr std::size_t kMinWriteBufferHighWater = 4 * kKiB;
// A request body is held in memory whole (and /echo sends it back): above this one request
// could take the daemon's memory, or fail to allocate.
constexpr std::size_t kMaxBodyBytes = 1 * kGiB;
constexpr std::string_view kBodyInMemory = "a request body is held in memory whole";
// The server-wide budgets: below this a single ordinary request would not fit.
constexpr std::size_t kMinBudgetBytes = 64 * kKiB;
// Timers add durations to the loop's clock; anything above a day is a typo, and the cap keeps
// those sums far from overflow.
constexpr Duration kMaxDuration = std::chrono::hours(24);
// A config file is a few KiB; the cap stops `--config /dev/zero` from reading forever.
constexpr std::size_t kMaxConfigFileBytes = 1 * kMiB;
// The Server header is sent on every response; keep it short.
constexpr std::size_t kMaxServerNameBytes = 256;

// Quotes a value for an error message, escaping what would garble a terminal and cutting it
// short, since the value may be anything the user wrote.
std::string quote(std::string_view text) {
  constexpr std::size_t kMaxShown = 80;
  std::string out = "\"";
  for (std::size_t i = 0; i < text.size() && i < kMaxShown; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    } else {
      out += static_cast<char>(c);
    }
  }
  if (text.size() > kMaxShown) out += "...";
  out += '"';
  return out;
}

// "expected a size such as "1MiB", got "lots"", with the reason appended when there is one.
[[noreturn]] void throw_expected(std::string_view expected, std::string_view text,
                                 std::string_view why = {}) {
  std::string message = "expected ";
  message += expected;
  message += ", got ";
  message += quote(text);
  if (!why.empty()) {
    message += ": ";
    message += why;
  }
  throw std::invalid_argument(message);
}

bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

// The leading decimal integer of a value such as "16KiB", and what follows it.
struct Number {
  std::uint64_t value = 0;
  bool overflow = false;
  std::string_view rest;
};

Number split_number(std::string_view text) {
  Number number;
  std::size_t i = 0;
  for (; i < text.size() && is_digit(text[i]); ++i) {
    const auto digit = static_cast<std::uint64_t>(text[i] - '0');
    if (number.value > (std::numeric_limits<std::uint64_t>::max() - digit) / 10) {
      number.overflow = true;
    } else {
      number.value = number.value * 10 + digit;
    }
  }
  number.rest = text.substr(i);
  return number;
}

// Shared shape checks for durations and sizes: a plain non-negative integer comes first.
Number parse_quantity(std::string_view text, std::string_view expected, std::string_view noun,
                      std::string_view fraction_hint) {
  if (!text.empty() && text[0] == '-') {
    throw_expected(expected, text, "negative " + std::string(noun) + " are not allowed");
  }
  if (text.empty() || !is_digit(text[0])) throw_expected(expected, text);
  Number number = split_number(text);
  if (!number.rest.empty() && (number.rest[0] == '.' || number.rest[0] == ',')) {
    throw_expected(
        expected, text,
        "fractions are not allowed; use a smaller unit, e.g. " + std::string(fraction_hint));
  }
  if (number.overflow) throw_expected(expected, text, "too large");
  return number;
}

std::string format_size(std::size_t bytes) {
  if (bytes != 0 && bytes % kGiB == 0) return std::to_string(bytes / kGiB) + "GiB";
  if (bytes != 0 && bytes % kMiB == 0) return std::to_string(bytes / kMiB) + "MiB";
  if (bytes != 0 && bytes % kKiB == 0) return std::to_string(bytes / kKiB) + "KiB";
  return std::to_string(bytes) + "B";
}

std::string format_duration(Duration duration) {
  const auto ms = duration.count();
  if (ms != 0 && ms % 3'600'000 == 0) return std::to_string(ms / 3'600'000) + "h";
  if (ms != 0 && ms % 60'000 == 0) return std::to_string(ms / 60'000) + "m";
  if (ms != 0 && ms % 1'000 == 0) return std::to_string(ms / 1'000) + "s";
  return std::to_string(ms) + "ms";
}

// What a TOML value is, for "got ..." in messages: strings quoted, other values with their type.
std::string describe(const toml::node& node) {
  if (const auto* s = node.as_string()) return quote(s->get());
  if (const auto* i = node.as_integer()) return "integer " + std::to_string(i->get());
  if (const auto* f = node.as_floating_point()) {
    std::ostringstream out;
    out << "float " << *f;  // toml++ prints it as TOML would: 1.0, inf, nan.
    return out.str();
  }
  if (const auto* b = node.as_boolean()) return b->get() ? "boolean true" : "boolean false";
  if (node.is_array()) return "an array";
  if (node.is_table()) return "a table";
  if (node.is_date()) return "a date";
  if (node.is_time()) return "a time";
  if (node.is_date_time()) return "a date-time";
  return "an unknown value";
}

// A key as written, quoted only when it is not a bare TOML key, so odd names stay readable.
std::string key_text(std::string_view key) {
  const bool bare = !key.empty() && std::all_of(key.begin(), key.end(), [](char c) {
    return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == '-';
  });
  return bare ? std::string(key) : quote(key);
}

// The canonical form of a numeric address, so "::1" and "0:0:0:0:0:0:0:1" compare equal.
std::string canonical_host(const std::string& host) {
  in6_addr v6{};
  char buffer[INET6_ADDRSTRLEN] = {};
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1 &&
      inet_ntop(AF_INET6, &v6, buffer, sizeof buffer) != nullptr) {
    return buffer;
  }
  return host;
}

// Where a value came from, for error messages.
struct Where {
  std::string_view table;  // Empty at the top level.
  std::string_view key;
  const toml::source_region& region;
};

using Entry = std::pair<const toml::key*, const toml::node*>;

// toml++ tables iterate in key order; checking in document order reports the first mistake in
// the file rather than the alphabetically first one.
std::vector<Entry> in_document_order(const toml::table& table) {
  std::vector<Entry> entries;
  for (const auto& [key, node] : table) entries.emplace_back(&key, &node);
  std::stable_sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.first->source().begin < b.first->source().begin;
  });
  return entries;
}

class Loader {
 public:
  explicit Loader(const std::string& source) : source_(source) {}
  // The fields below hold `this` and references into config_.
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  Config load(const toml::table& root) {
    for (const auto& [key, node] : in_document_order(root)) load_table(*key, *node);
    check_across_keys();
    return config_;
  }

 private:
  // One key of a table: its name and how to store its value.
  struct Field {
    std::string_view name;
    std::function<void(const toml::node&, const Where&)> load;
  };

  [[noreturn]] void fail(const Where& where, std::string_view message) const {
    std::string text = source_;
    if (where.region.begin.line != 0) text += ":" + std::to_string(where.region.begin.line);
    text += ": ";
    if (!where.table.empty()) {
      text += "[";
      text += where.table;
      text += "]";
      if (!where.key.empty()) text += " ";
    }
    text += key_text(where.key);
    text += ": ";
    text += message;
    throw ConfigError(text);
  }

  // The same key, pointing at a value's own line (an array element may be lines below its key).
  static Where at(const Where& where, const toml::node& node) {
    if (node.source().begin.line == 0) return where;
    return Where{where.table, where.key, node.source()};
  }

  [[noreturn]] void fail_type(const Where& where, const toml::node& node,
                              std::string_view expected) const {
    fail(at(where, node), "expected " + std::string(expected) + ", got " + describe(node));
  }

  void load_table(const toml::key& key, const toml::node& node) {
    const std::string_view name = key.str();
    const std::vector<Field>* fields = nullptr;
    if (name == "server") fields = &server_fields_;
    if (name == "limits") fields = &limits_fields_;
    if (name == "timeouts") fields = &timeouts_fields_;
    if (name == "log") fields = &log_fields_;
    if (name == "loop") fields = &loop_fields_;
    if (name == "routes") fields = &routes_fields_;
    if (name == "smtp") fields = &smtp_fields_;
    if (name == "jobs") fields = &jobs_fields_;
    if (name == "auth") fields = &auth_fields_;
    if (name == "policy") fields = &policy_fields_;
    if (name == "quota") fields = &quota_fields_;
    if (name == "webhooks") fields = &webhooks_fields_;
    const Where where{{}, name, key.source()};
    if (fields == nullptr) {
      if (node.is_table()) {
        fail(where,
             "unknown table; expected one of [server], [limits], [timeouts], [log], [loop], "
             "[routes], [smtp], [jobs], [auth], [policy], [quota], [webhooks]");
      }
      fail(where, "unknown key outside any table; settings belong in a table such as [server]");
    }
    const toml::table* table = node.as_table();
    if (table == nullptr) fail_type(where, node, "a table [" + std::string(name) + "]");

    for (const auto& [field_key, value] : in_document_order(*table)) {
      // A structured binding cannot be captured by a lambda before C++20's P1091 (clang 14).
      const std::string_view key_name = field_key->str();
      const Where field_where{name, key_name, field_key->source()};
      const auto field = std::find_if(fields->begin(), fields->end(),
                                      [key_name](const Field& f) { return f.name == key_name; });
      if (field == fields->end()) {
        std::string known;
        for (const Field& f : *fields) {
          if (!known.empty()) known += ", ";
          known += f.name;
        }
        fail(field_where, "unknown key; expected one of " + known);
      }
      field->load(*value, field_where);
    }
  }

  std::string_view get_string(const toml::node& node, const Where& where,
                              std::string_view expected) const {
    const auto* value = node.as_string();
    if (value == nullptr) fail_type(where, node, expected);
    return value->get();
  }

  bool get_bool(const toml::node& node, const Where& where) const {
    const auto* value = node.as_boolean();
    if (value == nullptr) fail_type(where, node, "true or false");
    return value->get();
  }

  std::int64_t get_integer(const toml::node& node, const Where& where, std::int64_t max) const {
    const std::string expected = "an integer from 1 to " + std::to_string(max);
    const auto* value = node.as_integer();
    if (value == nullptr) fail_type(where, node, expected);
    if (value->get() < 1 || value->get() > max) fail_type(where, node, expected);
    return value->get();
  }

  std::size_t get_size(const toml::node& node, const Where& where, std::size_t min, std::size_t max,
                       std::string_view why_max = {}) const {
    const std::string_view text = get_string(node, where, "a size such as \"1MiB\"");
    std::size_t size = 0;
    try {
      size = parse_size(text);
    } catch (const std::invalid_argument& e) {
      fail(at(where, node), e.what());
    }
    if (size < min) {
      fail(at(where, node), "must be at least " + format_size(min) + ", got " + quote(text));
    }
    if (size > max) {
      std::string message = "must be at most " + format_size(max);
      if (!why_max.empty()) message += " (" + std::string(why_max) + ")";
      fail(at(where, node), message + ", got " + quote(text));
    }
    return size;
  }

  Duration get_duration(const toml::node& node, const Where& where,
                        Duration max = kMaxDuration) const {
    const std::string_view text = get_string(node, where, "a duration such as \"10s\"");
    Duration duration{};
    try {
      duration = parse_duration(text);
    } catch (const std::invalid_argument& e) {
      fail(at(where, node), e.what());
    }
    // Every duration here is a timer or a threshold; zero would fire at once or spin the loop.
    if (duration.count() <= 0)
      fail(at(where, node), "must be greater than zero, got " + quote(text));
    if (duration > max) {
      fail(at(where, node), "must be at most " + format_duration(max) + ", got " + quote(text));
    }
    return duration;
  }

  // A log destination: a path or a keyword. A NUL would silently cut the path short.
  std::string get_log_target(const toml::node& node, const Where& where,
                             std::string_view expected) const {
    const std::string_view text = get_string(node, where, expected);
    if (text.empty()) fail(at(where, node), "expected " + std::string(expected) + ", got \"\"");
    if (text.find('\0') != std::string_view::npos) {
      fail(at(where, node), "the path contains a NUL character: " + quote(text));
    }
    return std::string(text);
  }

  void load_listen(const toml::node& node, const Where& where) {
    constexpr std::string_view kExpected = "an array of addresses such as [\"127.0.0.1:8080\"]";
    const auto* array = node.as_array();
    if (array == nullptr) fail_type(where, node, kExpected);
    if (array->empty()) fail(at(where, node), "at least one listen address is required");

    std::vector<ListenAddress> addresses;
    std::vector<std::pair<std::string, std::uint32_t>> seen_lines;  // canonical text, line
    for (const toml::node& element : *array) {
      const std::string_view text =
          get_string(element, where, "an address such as \"127.0.0.1:8080\"");
      ListenAddress address;
      try {
        address = parse_listen_address(text);
      } catch (const std::invalid_argument& e) {
        fail(at(where, element), e.what());
      }
      // Port 0 asks the kernel for a fresh port on each bind, so repeats of it never collide.
      if (address.port != 0) {
        const std::string canonical =
            ListenAddress{canonical_host(address.host), address.port}.text();
        for (const auto& [other, line] : seen_lines) {
          if (other == canonical) {
            fail(at(where, element),
                 quote(text) + " is listed twice (first on line " + std::to_string(line) + ")");
          }
        }
        seen_lines.emplace_back(canonical, element.source().begin.line);
      }
      addresses.push_back(std::move(address));
    }
    config_.server.listen = std::move(addresses);
  }

  void load_server_name(const toml::node& node, const Where& where) {
    const std::string_view text = get_string(node, where, "a string");
    // The name goes verbatim into every response's Server header, so it must be a valid field
    // value: anything else would corrupt responses or let the config inject headers.
    const bool printable = std::all_of(text.begin(), text.end(), [](char c) {
      return static_cast<unsigned char>(c) >= 0x20 && static_cast<unsigned char>(c) < 0x7f;
    });
    if (text.empty() || !printable || text.front() == ' ' || text.back() == ' ' ||
        text.size() > kMaxServerNameBytes) {
      fail(at(where, node),
           "expected printable ASCII of 1 to " + std::to_string(kMaxServerNameBytes) +
               " characters without leading or trailing spaces (it is sent as the Server "
               "header), got " +
               quote(text));
    }
    config_.server.name = std::string(text);
  }

  // [server] workers: a count of event loops, or "auto" (stored as 0: one per usable core).
  void load_workers(const toml::node& node, const Where& where) {
    const std::string expected =
        "an integer from 1 to " + std::to_string(kMaxWorkers) + " or \"auto\"";
    if (const auto* text = node.as_string()) {
      if (text->get() != "auto") fail_type(where, node, expected);
      config_.server.workers = 0;
      return;
    }
    const auto* value = node.as_integer();
    if (value == nullptr || value->get() < 1 || value->get() > kMaxWorkers) {
      fail_type(where, node, expected);
    }
    config_.server.workers = static_cast<std::size_t>(value->get());
  }

  // Plain text; `allow_empty` for keys whose empty value means "not set".
  Field text(std::string_view name, std::string& member, bool allow_empty) {
    return field(name, member,
                 [allow_empty](const Loader* self, const toml::node& node, const Where& where) {
                   const std::string_view value = self->get_string(node, where, "a string");
                   if (value.empty() && !allow_empty)
                     self->fail(self->at(where, node), "must not be empty");
                   if (value.find('\0') != std::string_view::npos) {
                     self->fail(self->at(where, node), "must not contain a NUL byte");
                   }
                   return std::string(value);
                 });
  }

  void load_smtp_url(const toml::node& node, const Where& where) {
    constexpr std::string_view kExpected =
        "a URL such as \"smtp://127.0.0.1:25\" or \"smtps://host:465\", or "
        "\"maildir:PATH\"";
    const std::string_view value = get_string(node, where, kExpected);
    if (value.find_first_of("\t\r\n") != std::string_view::npos ||
        value.find('\0') != std::string_view::npos) {
      fail_type(where, node, kExpected);
    }
    if (value.starts_with("maildir:")) {
      // A directory for the development transport: any path but an empty one.
      if (value.size() == std::string_view("maildir:").size()) {
        fail(at(where, node), "\"maildir:\" needs a directory, e.g. \"maildir:squall-mail\"");
      }
      config_.smtp.url = std::string(value);
      return;
    }
    const bool scheme_ok = value.rfind("smtp://", 0) == 0 || value.rfind("smtps://", 0) == 0;
    if (!scheme_ok || value.size() <= value.find("://") + 3 ||
        value.find(' ') != std::string_view::npos) {
      fail_type(where, node, kExpected);
    }
    config_.smtp.url = std::string(value);
  }

  // A SQLite file's path, or a PostgreSQL URL ("postgresql://" or "postgres://"). The URL must
  // not carry a password: the config file is often readable by others (installed 0644), and
  // the URL appears in logs; libpq reads it from ~/.pgpass or a passfile= parameter instead.
  void load_jobs_store(const toml::node& node, const Where& where) {
    const std::string_view value =
        get_string(node, where, "a SQLite file's path or a postgresql:// URL");
    if (value.empty()) fail(at(where, node), "must not be empty");
    if (value.find_first_of(std::string_view("\t\r\n\0", 4)) != std::string_view::npos) {
      fail(at(where, node), "must not contain control characters");
    }
    if (value.starts_with("postgresql://") || value.starts_with("postgres://")) {
      const std::size_t authority = value.find("://") + 3;
      const std::string_view rest = value.substr(authority);
      const std::string_view userinfo_and_host = rest.substr(0, rest.find_first_of("/?"));
      const std::size_t at_sign = userinfo_and_host.rfind('@');
      const bool password_in_userinfo =
          at_sign != std::string_view::npos &&
          userinfo_and_host.substr(0, at_sign).find(':') != std::string_view::npos;
      const std::size_t query = rest.find('?');
      const bool password_parameter =
          query != std::string_view::npos &&
          (rest.find("?password=") == query || rest.find("&password=") != std::string_view::npos);
      if (password_in_userinfo || password_parameter) {
        fail(at(where, node),
             "the URL contains a password; put it in the server's ~/.pgpass or a file named by "
             "passfile=PATH in the URL (mode 0600), not in the config file");
      }
    }
    config_.jobs.store = std::string(value);
  }

  // "" (webhooks off) or an http:// or https:// URL with a host, without spaces or controls.
  void load_webhooks_url(const toml::node& node, const Where& where) {
    constexpr std::string_view kExpected =
        "\"\" (off) or a URL such as \"https://example.com/hooks/squall\"";
    const std::string_view value = get_string(node, where, kExpected);
    if (!value.empty()) {
      const bool scheme_ok = value.starts_with("http://") || value.starts_with("https://");
      bool clean = true;
      for (const char c : value) {
        const auto u = static_cast<unsigned char>(c);
        if (u <= 0x20 || u == 0x7f) clean = false;
      }
      if (!scheme_ok || !clean || value.size() <= value.find("://") + 3) {
        fail_type(where, node, kExpected);
      }
    }
    config_.webhooks.url = std::string(value);
    webhook_url_where_ = Seen{where.table, where.key, node.source()};
  }

  // Where a key was set, kept for checks that involve more than one key.
  struct Seen {
    std::string_view table;
    std::string_view key;
    toml::source_region region;
  };

  Field remembered(Field inner, std::optional<Seen>& seen) {
    return Field{inner.name, [inner, &seen](const toml::node& node, const Where& where) {
                   inner.load(node, where);
                   seen = Seen{where.table, where.key, node.source()};
                 }};
  }

  // Fails naming `seen` (with its line), or the key without a line when it was left default.
  [[noreturn]] void fail_seen(const std::optional<Seen>& seen, std::string_view table,
                              std::string_view key, std::string_view message) const {
    static const toml::source_region kNoRegion{};
    if (seen) fail(Where{seen->table, seen->key, seen->region}, message);
    fail(Where{table, key, kNoRegion}, message);
  }

  void check_across_keys() const {
    if (config_.jobs.max_concurrent >= config_.server.thread_pool_size) {
      // libuv's own file and DNS work shares the pool: sends must leave it a thread.
      fail_seen(sends_where_ ? sends_where_ : pool_where_, "jobs", "max_concurrent_sends",
                "max_concurrent_sends (" + std::to_string(config_.jobs.max_concurrent) +
                    ") must be below [server] thread_pool_size (" +
                    std::to_string(config_.server.thread_pool_size) +
                    "): libuv's file and DNS work shares the pool");
    }
    if (!config_.smtp.password_file.empty() && !config_.smtp.password_env.empty()) {
      fail_seen(password_where_, "smtp", "password_env",
                "set password_file or password_env, not both");
    }
    if (config_.jobs.lease <= config_.smtp.connect_timeout + config_.smtp.timeout) {
      // A send still running when its lease ends would be claimed and sent again.
      fail_seen(lease_where_, "jobs", "lease",
                "lease (" + std::to_string(config_.jobs.lease.count()) +
                    " ms) must be longer than [smtp] connect_timeout + timeout (" +
                    std::to_string((config_.smtp.connect_timeout + config_.smtp.timeout).count()) +
                    " ms), or a send still running would be claimed again");
    }
    if (config_.limits.max_body_bytes > config_.limits.max_buffered_body_bytes) {
      // Such a body could never be received: the server-wide budget would refuse it.
      fail_seen(body_where_ ? body_where_ : body_budget_where_, "limits", "max_body_bytes",
                "max_body_bytes (" + format_size(config_.limits.max_body_bytes) +
                    ") must not exceed max_buffered_body_bytes (" +
                    format_size(config_.limits.max_buffered_body_bytes) + ")");
    }
    if (config_.jobs.retry_max < config_.jobs.retry_initial) {
      fail_seen(retry_where_, "jobs", "retry_max", "retry_max must not be below retry_initial");
    }
    if (!config_.webhooks.url.empty() && config_.webhooks.secret_file.empty()) {
      fail_seen(webhook_url_where_, "webhooks", "url",
                "webhooks need [webhooks] secret_file (the key they are signed with)");
    }
    const bool implicit_tls = config_.smtp.url.rfind("smtps://", 0) == 0;
    if (!config_.smtp.username.empty() && !implicit_tls &&
        config_.smtp.starttls != mail::SmtpSettings::StartTls::required) {
      // With "opportunistic", a relay (or anyone in between) that offers no STARTTLS gets
      // the password in clear text; with "off" everyone on the path does.
      fail_seen(username_where_, "smtp", "username",
                "a username needs an encrypted connection, or the password goes in clear "
                "text: use an smtps:// url or starttls = \"required\"");
    }
  }

  // A list of mail domains ("example.com"), kept in lower case: LDH labels separated by dots.
  Field domains(std::string_view name, std::vector<std::string>& member) {
    return field(name, member, [](const Loader* self, const toml::node& node, const Where& where) {
      constexpr std::string_view kExpected = "an array of domains such as [\"example.com\"]";
      const auto* array = node.as_array();
      if (array == nullptr) self->fail_type(where, node, kExpected);
      std::vector<std::string> result;
      for (const toml::node& element : *array) {
        const std::string_view text =
            self->get_string(element, where, "a domain such as \"example.com\"");
        std::string domain;
        bool valid = !text.empty() && text.size() <= 253 && text.front() != '.' &&
                     text.back() != '.' && text.find("..") == std::string_view::npos;
        for (const char c : text) {
          const bool ldh = is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                           c == '-' || c == '.';
          if (!ldh) valid = false;
          domain += (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
        }
        if (!valid) {
          self->fail(self->at(where, element),
                     "expected a domain of letters, digits, hyphens and dots such as "
                     "\"example.com\", got " +
                         quote(text));
        }
        result.push_back(std::move(domain));
      }
      return result;
    });
  }

  Field access(std::string_view name, RouteAccess& member) {
    return choice(name, member,
                  {{"open", RouteAccess::open},
                   {"loopback", RouteAccess::loopback},
                   {"token", RouteAccess::token},
                   {"loopback-or-token", RouteAccess::loopback_or_token}});
  }

  void load_log_level(const toml::node& node, const Where& where) {
    constexpr std::string_view kExpected =
        "one of \"trace\", \"debug\", \"info\", \"warn\", \"error\", \"critical\", \"off\"";
    const std::string_view text = get_string(node, where, kExpected);
    constexpr std::string_view kLevels[] = {"trace", "debug",    "info", "warn",
                                            "error", "critical", "off"};
    if (std::find(std::begin(kLevels), std::end(kLevels), text) == std::end(kLevels)) {
      fail_type(where, node, kExpected);
    }
    config_.log.level = std::string(text);
  }

  void load_error_log(const toml::node& node, const Where& where) {
    std::string target = get_log_target(node, where, "\"stderr\" or a path");
    // "off" works for access_log; here it would quietly create a file named "off".
    if (target == "off") {
      fail(at(where, node),
           "the error log cannot be turned off this way (it would be a file named \"off\"); "
           "use [log] level = \"off\"");
    }
    config_.log.error_log = std::move(target);
  }

  // Binds a Field to a member through `load`, so each table below is one line per key.
  template <typename T, typename Load>
  Field field(std::string_view name, T& member, Load load) {
    return Field{name, [this, &member, load](const toml::node& node, const Where& where) {
                   member = load(this, node, where);
                 }};
  }

  Field duration(std::string_view name, Duration& member) {
    return field(name, member, [](const Loader* self, const toml::node& node, const Where& where) {
      return self->get_duration(node, where);
    });
  }

  // One of a few words, each naming an enum value.
  template <typename Enum>
  Field choice(std::string_view name, Enum& member,
               std::vector<std::pair<std::string_view, Enum>> words) {
    std::string expected;
    for (std::size_t i = 0; i < words.size(); ++i) {
      if (i > 0) expected += i + 1 == words.size() ? " or " : ", ";
      expected += "\"" + std::string(words[i].first) + "\"";
    }
    return field(name, member,
                 [words, expected](const Loader* self, const toml::node& node, const Where& where) {
                   const std::string_view value = self->get_string(node, where, expected);
                   for (const auto& [word, meaning] : words) {
                     if (value == word) return meaning;
                   }
                   self->fail_type(where, node, expected);
                 });
  }

  Field boolean(std::string_view name, bool& member) {
    return field(name, member, [](const Loader* self, const toml::node& node, const Where& where) {
      return self->get_bool(node, where);
    });
  }

  template <typename T>
  Field count(std::string_view name, T& member, std::int64_t max) {
    return field(name, member,
                 [max](const Loader* self, const toml::node& node, const Where& where) {
                   return static_cast<T>(self->get_integer(node, where, max));
                 });
  }

  Field size(std::string_view name, std::size_t& member, std::size_t min,
             std::size_t max = std::numeric_limits<std::size_t>::max(),
             std::string_view why_max = {}) {
    return field(
        name, member,
        [min, max, why_max](const Loader* self, const toml::node& node, const Where& where) {
          return self->get_size(node, where, min, max, why_max);
        });
  }

  Field method(std::string_view name, void (Loader::*load)(const toml::node&, const Where&)) {
    return Field{name, [this, load](const toml::node& node, const Where& where) {
                   (this->*load)(node, where);
                 }};
  }

  static constexpr std::string_view kBufferCap =
      "the parser's read buffer holds the URL and headers";
  static constexpr std::int64_t kMaxCount = std::numeric_limits<std::int64_t>::max();
  static constexpr std::int64_t kMaxWorkers = 256;  // [server] workers: far above any core count.
  // Ten years: long enough for any retention policy, far from the clock's overflow.
  static constexpr Duration kMaxRetain = std::chrono::hours(24 * 3650);

  const std::string& source_;
  Config config_;
  std::optional<Seen> pool_where_;         // Where [server] thread_pool_size was set.
  std::optional<Seen> sends_where_;        // Where [jobs] max_concurrent_sends was set.
  std::optional<Seen> password_where_;     // Where [smtp] password_env was set.
  std::optional<Seen> retry_where_;        // Where [jobs] retry_max was set.
  std::optional<Seen> lease_where_;        // Where [jobs] lease was set.
  std::optional<Seen> webhook_url_where_;  // Where [webhooks] url was set.
  std::optional<Seen> body_where_;         // Where [limits] max_body_bytes was set.
  std::optional<Seen> body_budget_where_;  // Where [limits] max_buffered_body_bytes was set.
  std::optional<Seen> username_where_;     // Where [smtp] username was set.

  const std::vector<Field> server_fields_{
      method("listen", &Loader::load_listen),
      count("backlog", config_.server.backlog, std::numeric_limits<int>::max()),
      count("max_connections", config_.server.max_connections, kMaxCount),
      method("name", &Loader::load_server_name),
      text("user", config_.server.user, true),
      text("group", config_.server.group, true),
      remembered(count("thread_pool_size", config_.server.thread_pool_size, 1024), pool_where_),
      method("workers", &Loader::load_workers),
  };
  const std::vector<Field> limits_fields_{
      size("max_url_bytes", config_.limits.max_url_bytes, 1, kMaxUrlOrHeaderBytes, kBufferCap),
      size("max_header_bytes", config_.limits.max_header_bytes, kMinHeaderBytes,
           kMaxUrlOrHeaderBytes, kBufferCap),
      count("max_header_count", config_.limits.max_header_count, kMaxCount),
      // Zero is meaningful for these two: refuse every body, or every chunk extension.
      remembered(
          size("max_body_bytes", config_.limits.max_body_bytes, 0, kMaxBodyBytes, kBodyInMemory),
          body_where_),
      size("max_chunk_extension_bytes", config_.limits.max_chunk_extension_bytes, 0),
      size("write_buffer_high_water", config_.limits.write_buffer_high_water,
           kMinWriteBufferHighWater),
      remembered(
          size("max_buffered_body_bytes", config_.limits.max_buffered_body_bytes, kMinBudgetBytes),
          body_budget_where_),
      size("max_unsent_bytes", config_.limits.max_unsent_bytes, kMinBudgetBytes),
  };
  const std::vector<Field> timeouts_fields_{
      duration("header", config_.timeouts.header),       duration("body", config_.timeouts.body),
      duration("keepalive", config_.timeouts.keepalive), duration("write", config_.timeouts.write),
      duration("lingering", config_.timeouts.lingering), duration("drain", config_.timeouts.drain),
  };
  const std::vector<Field> log_fields_{
      method("level", &Loader::load_log_level),
      method("error_log", &Loader::load_error_log),
      field("access_log", config_.log.access_log,
            [](const Loader* self, const toml::node& node, const Where& where) {
              return self->get_log_target(node, where, "\"stderr\", \"off\" or a path");
            }),
      choice("access_format", config_.log.access_format,
             {{"combined", AccessLogFormat::combined}, {"json", AccessLogFormat::json}}),
  };
  const std::vector<Field> loop_fields_{
      duration("lag_interval", config_.loop.lag_interval),
      duration("blocking_threshold", config_.loop.blocking_threshold),
  };
  const std::vector<Field> routes_fields_{
      boolean("plaintext", config_.routes.plaintext), boolean("healthz", config_.routes.healthz),
      boolean("metrics", config_.routes.metrics),     boolean("echo", config_.routes.echo),
      boolean("email", config_.routes.email),         boolean("jobs", config_.routes.jobs),
  };
  const std::vector<Field> smtp_fields_{
      method("url", &Loader::load_smtp_url),
      choice("starttls", config_.smtp.starttls,
             {{"off", mail::SmtpSettings::StartTls::off},
              {"opportunistic", mail::SmtpSettings::StartTls::opportunistic},
              {"required", mail::SmtpSettings::StartTls::required}}),
      remembered(text("username", config_.smtp.username, true), username_where_),
      text("password_file", config_.smtp.password_file, true),
      remembered(text("password_env", config_.smtp.password_env, true), password_where_),
      text("from", config_.smtp.from, false),
      duration("connect_timeout", config_.smtp.connect_timeout),
      duration("timeout", config_.smtp.timeout),
      text("ca_file", config_.smtp.ca_file, true),
      boolean("tls_verify", config_.smtp.tls_verify),
      count("connections", config_.smtp.connections, 1024),
      duration("idle_timeout", config_.smtp.idle_timeout),
  };
  const std::vector<Field> jobs_fields_{
      method("store", &Loader::load_jobs_store),
      choice("durability", config_.jobs.durability,
             {{"full", Durability::full}, {"normal", Durability::normal}}),
      count("max_queued", config_.jobs.max_queued, kMaxCount),
      remembered(count("max_concurrent_sends", config_.jobs.max_concurrent, 1024), sends_where_),
      count("max_attempts", config_.jobs.max_attempts, 1000),
      duration("retry_initial", config_.jobs.retry_initial),
      remembered(duration("retry_max", config_.jobs.retry_max), retry_where_),
      remembered(duration("lease", config_.jobs.lease), lease_where_),
      duration("poll_interval", config_.jobs.poll_interval),
      count("max_recipients", config_.jobs.max_recipients, 10000),
      size("max_email_bytes", config_.jobs.max_email_bytes, 1, 64 * 1024 * 1024,
           "an email is held in memory while it is sent"),
      field("retain", config_.jobs.retain,
            [](const Loader* self, const toml::node& node, const Where& where) {
              return self->get_duration(node, where, kMaxRetain);
            }),
      size("max_queued_bytes", config_.jobs.max_queued_bytes, 1),
  };
  const std::vector<Field> auth_fields_{
      text("tokens_file", config_.auth.tokens_file, true),
      boolean("anonymous", config_.auth.anonymous),
      access("healthz", config_.auth.healthz),
      access("metrics", config_.auth.metrics),
      access("echo", config_.auth.echo),
  };
  const std::vector<Field> policy_fields_{
      domains("recipient_domains", config_.policy.recipient_domains),
      domains("blocked_recipient_domains", config_.policy.blocked_recipient_domains),
      boolean("ip_literal_recipients", config_.policy.ip_literal_recipients),
  };
  const std::vector<Field> quota_fields_{
      count("token_per_minute", config_.quota.token_per_minute, 6'000'000),
      count("token_burst", config_.quota.token_burst, 1'000'000),
      count("address_per_minute", config_.quota.address_per_minute, 6'000'000),
      count("address_burst", config_.quota.address_burst, 1'000'000),
      count("max_queued_per_client", config_.quota.max_queued_per_client, kMaxCount),
  };
  const std::vector<Field> webhooks_fields_{
      method("url", &Loader::load_webhooks_url),
      text("secret_file", config_.webhooks.secret_file, true),
      duration("timeout", config_.webhooks.timeout),
      count("max_attempts", config_.webhooks.max_attempts, 1000),
  };
};

}  // namespace

std::string ListenAddress::text() const {
  const std::string port_text = std::to_string(port);
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + port_text;
  return host + ":" + port_text;
}

ListenAddress parse_listen_address(std::string_view text) {
  constexpr std::string_view kExpected = "an address such as \"127.0.0.1:8080\" or \"[::1]:8080\"";
  if (text.empty()) throw_expected(kExpected, text);
  // Spaces and control characters are never part of an address; a NUL would also cut the
  // string short for inet_pton.
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u >= 0x7f)
      throw_expected(kExpected, text, "contains a space or control character");
  }

  std::string_view host;
  std::string_view port_text;
  const bool bracketed = text.front() == '[';
  if (bracketed) {
    const std::size_t close = text.find(']');
    if (close == std::string_view::npos) throw_expected(kExpected, text, "missing ']'");
    host = text.substr(1, close - 1);
    const std::string_view rest = text.substr(close + 1);
    if (rest.empty() || rest.front() != ':') {
      throw_expected(kExpected, text, "expected \":PORT\" after ']'");
    }
    port_text = rest.substr(1);
  } else {
    const std::size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) throw_expected(kExpected, text, "expected HOST:PORT");
    host = text.substr(0, colon);
    port_text = text.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) {
      throw_expected(kExpected, text, "IPv6 addresses must be in brackets, e.g. \"[::1]:8080\"");
    }
  }
  if (host.empty())
    throw_expected(kExpected, text, "missing host (\"0.0.0.0\" means every address)");

  const std::string host_string(host);
  if (bracketed) {
    in6_addr v6{};
    if (inet_pton(AF_INET6, host_string.c_str(), &v6) != 1) {
      in_addr v4{};
      if (inet_pton(AF_INET, host_string.c_str(), &v4) == 1) {
        throw_expected(kExpected, text, "brackets are only for IPv6 addresses");
      }
      throw_expected(kExpected, text, quote(host) + " is not a numeric IPv6 address");
    }
  } else {
    in_addr v4{};
    if (inet_pton(AF_INET, host_string.c_str(), &v4) != 1) {
      throw_expected(kExpected, text,
                     quote(host) + " is not a numeric IPv4 address (host names are not resolved)");
    }
  }

  if (port_text.empty()) throw_expected(kExpected, text, "missing port");
  const Number port = split_number(port_text);
  if (!port.rest.empty()) {
    throw_expected(kExpected, text, "port " + quote(port_text) + " is not a number");
  }
  if (port.overflow || port.value > 65535) {
    throw_expected(kExpected, text, "port " + std::string(port_text) + " is not in 0-65535");
  }
  return ListenAddress{host_string, static_cast<std::uint16_t>(port.value)};
}

Duration parse_duration(std::string_view text) {
  constexpr std::string_view kExpected = "a duration such as \"10s\"";
  const Number number = parse_quantity(text, kExpected, "durations", "\"1500ms\"");
  std::int64_t unit_ms = 0;
  if (number.rest == "ms") {
    unit_ms = 1;
  } else if (number.rest == "s") {
    unit_ms = 1'000;
  } else if (number.rest == "m") {
    unit_ms = 60'000;
  } else if (number.rest == "h") {
    unit_ms = 3'600'000;
  } else if (number.rest == "d") {
    unit_ms = 86'400'000;
  } else if (number.rest.empty()) {
    throw_expected(kExpected, text, "missing unit; use ms, s, m, h or d");
  } else {
    throw_expected(kExpected, text,
                   "unknown unit " + quote(number.rest) + "; use ms, s, m, h or d");
  }
  constexpr auto kMax = static_cast<std::uint64_t>(std::numeric_limits<Duration::rep>::max());
  if (number.value > kMax / static_cast<std::uint64_t>(unit_ms)) {
    throw_expected(kExpected, text, "too large");
  }
  return Duration(static_cast<Duration::rep>(number.value) * unit_ms);
}

std::size_t parse_size(std::string_view text) {
  constexpr std::string_view kExpected = "a size such as \"1MiB\"";
  const Number number = parse_quantity(text, kExpected, "sizes", "\"1536KiB\"");
  std::size_t unit = 0;
  if (number.rest.empty() || number.rest == "B") {
    unit = 1;
  } else if (number.rest == "KiB") {
    unit = kKiB;
  } else if (number.rest == "MiB") {
    unit = kMiB;
  } else if (number.rest == "GiB") {
    unit = kGiB;
  } else {
    throw_expected(kExpected, text,
                   "unknown unit " + quote(number.rest) + "; use B, KiB, MiB or GiB");
  }
  if (number.value > std::numeric_limits<std::size_t>::max() / unit) {
    throw_expected(kExpected, text, "too large");
  }
  return static_cast<std::size_t>(number.value) * unit;
}

Config load_config_file(const std::string& path) {
  // Read with C stdio rather than iostreams so that a failure leaves errno to report.
  const std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(path.c_str(), "rb"),
                                                             &std::fclose);
  if (!file) {
    throw ConfigError(
        path + ": cannot open: " + std::error_code(errno, std::generic_category()).message());
  }
  std::string text;
  char buffer[8192];
  std::size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof buffer, file.get())) > 0) {
    text.append(buffer, n);
    if (text.size() > kMaxConfigFileBytes) {
      throw ConfigError(path + ": larger than " + format_size(kMaxConfigFileBytes) +
                        "; is this the config file?");
    }
  }
  if (std::ferror(file.get())) {
    throw ConfigError(
        path + ": cannot read: " + std::error_code(errno, std::generic_category()).message());
  }
  return load_config_string(text, path);
}

Config load_config_string(std::string_view toml_text, const std::string& source_name) {
  toml::table root;
  try {
    root = toml::parse(toml_text, std::string_view(source_name));
  } catch (const toml::parse_error& e) {
    const toml::source_position& pos = e.source().begin;
    throw ConfigError(source_name + ":" + std::to_string(pos.line) + ":" +
                      std::to_string(pos.column) +
                      ": TOML syntax error: " + std::string(e.description()));
  }
  return Loader(source_name).load(root);
}

}  // namespace squall::squalld

#include "server/jobs_service.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <optional>
#include <span>
#include <stdexcept>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "squall/mail/email.hpp"
#include "squall/mail/maildir.hpp"

namespace squall::squalld {

namespace {

constexpr std::size_t kMaxIdempotencyKeyBytes = 255;
constexpr std::string_view kJsonType = "application/json";
// Seconds a client is asked to wait (Retry-After) when the store cannot take its job.
constexpr std::string_view kStoreRetryAfter = "5";
// A healthy store is probed with a write this often (seconds), a failing one every second.
constexpr unsigned kProbeEvery = 10;
// Retention works in rounds of at most this many deleted jobs (one short transaction each,
// about a millisecond), queued behind waiting inserts, so a purge never stalls accepts long;
// then at most kCompactPages free pages go back to the file system.
constexpr std::size_t kPurgeBatch = 500;
constexpr std::int64_t kCompactPages = 2048;

std::string iso8601(std::int64_t unix_ms) {
  if (unix_ms <= 0) return {};
  const std::time_t seconds = static_cast<std::time_t>(unix_ms / 1000);
  std::tm utc{};
  gmtime_r(&seconds, &utc);
  char text[32];
  const std::size_t length = std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%S", &utc);
  return std::string(text, length) + "." + std::to_string(1000 + unix_ms % 1000).substr(1) + "Z";
}

// The reply code of "SMTP 550 ... (RCPT TO:<...>)", or 0.
int smtp_code(std::string_view error) {
  constexpr std::string_view kSmtp = "SMTP ";
  if (error.substr(0, kSmtp.size()) != kSmtp || error.size() < kSmtp.size() + 3) return 0;
  int code = 0;
  for (std::size_t i = kSmtp.size(); i < kSmtp.size() + 3; ++i) {
    if (error[i] < '0' || error[i] > '9') return 0;
    code = code * 10 + (error[i] - '0');
  }
  return code;
}

// What a client may learn of a failed attempt: a fixed summary chosen from the error text, with
// at most the relay's reply code and the attempt count copied from it. The full text (which
// names recipients, the relay's URL and its reply) stays in the error log, where the runner
// wrote it.
std::string public_error(std::string_view error) {
  constexpr std::string_view kGaveUp = "gave up after ";
  if (error.substr(0, kGaveUp.size()) == kGaveUp) {
    std::size_t digits = kGaveUp.size();
    while (digits < error.size() && error[digits] >= '0' && error[digits] <= '9') ++digits;
    const std::size_t colon = error.find(": ", digits);
    const std::string count(error.substr(kGaveUp.size(), digits - kGaveUp.size()));
    if (!count.empty() && colon != std::string_view::npos) {
      return "gave up after " + count + " attempts: " + public_error(error.substr(colon + 2));
    }
    return "gave up after repeated failures";
  }
  if (const int code = smtp_code(error); code != 0) {
    const std::string suffix = " (" + std::to_string(code) + ")";
    const std::size_t open = error.rfind('(');
    const std::string_view stage = open == std::string_view::npos ? "" : error.substr(open + 1);
    if (stage.starts_with("RCPT")) return "relay refused a recipient" + suffix;
    if (stage.starts_with("MAIL")) return "relay refused the sender" + suffix;
    if (stage.starts_with("DATA") || stage.starts_with("end of DATA")) {
      return "relay refused the message" + suffix;
    }
    if (stage.starts_with("AUTH")) return "relay refused the login" + suffix;
    if (stage.starts_with("STARTTLS")) return "relay refused TLS" + suffix;
    if (stage.starts_with("greeting") || stage.starts_with("EHLO") || stage.starts_with("HELO")) {
      return "relay refused the connection" + suffix;
    }
    return "relay refused the email" + suffix;
  }
  const auto starts = [error](std::string_view prefix) { return error.starts_with(prefix); };
  if (starts("connection refused") || starts("could not connect")) {
    return "could not connect to the relay";
  }
  if (starts("could not resolve")) return "could not resolve the relay's host name";
  if (starts("timed out")) return "the relay did not answer in time";
  if (starts("connection failed")) return "the connection to the relay failed";
  if (starts("STARTTLS is required")) return "the relay offers no STARTTLS";
  if (starts("TLS setup failed")) return "TLS with the relay failed";
  if (starts("login denied")) return "the relay refused the login";
  if (starts("cannot prepare the job")) return "the job could not be prepared";
  return "delivery failed";
}

nlohmann::json job_json(const jobs::Job& job) {
  nlohmann::json body = {
      {"id", job.id},
      {"kind", job.kind},
      {"status", std::string(jobs::to_string(job.state))},
      {"attempts", job.attempts},
      {"last_error", job.last_error.empty() ? nlohmann::json(nullptr)
                                            : nlohmann::json(public_error(job.last_error))},
      {"created_at", iso8601(job.created_ms)},
      {"updated_at", iso8601(job.updated_ms)},
  };
  if (job.state == jobs::JobState::retrying || job.state == jobs::JobState::queued) {
    body["next_attempt_at"] = iso8601(job.run_after_ms);
  }
  if (job.finished_ms > 0) body["finished_at"] = iso8601(job.finished_ms);
  return body;
}

using Headers = std::vector<std::pair<std::string, std::string>>;

void send_json(const Reply& reply, int status, const nlohmann::json& body, Headers headers = {}) {
  reply(Answer{status, kJsonType, std::move(headers),
               body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n"});
}

// The answer to an accepted POST /email: Location and {"id": ..., "status": ...}, the bytes
// send_json writes for that object, without building one (a job id is hex digits and a state
// name a word: neither needs escaping).
void send_accepted(const Reply& reply, int status, const jobs::Job& job) {
  constexpr std::string_view kIdKey = R"({"id":")", kStatusKey = R"(","status":")";
  const std::string_view state = jobs::to_string(job.state);
  std::string body;
  body.reserve(kIdKey.size() + kStatusKey.size() + job.id.size() + state.size() + 3);
  body.append(kIdKey).append(job.id).append(kStatusKey).append(state).append("\"}\n");
  reply(Answer{status, kJsonType, {{"Location", "/jobs/" + job.id}}, std::move(body)});
}

void send_error(const Reply& reply, int status, std::string_view field, std::string_view message,
                Headers headers = {}) {
  nlohmann::json body = {{"error", message}};
  if (!field.empty()) body["field"] = field;
  send_json(reply, status, body, std::move(headers));
}

// The first line of a secret file ([smtp] password_file, [webhooks] secret_file, named by
// `key` in errors), which only its owner may read (as ssh insists for a private key): a
// password others can read is no secret.
std::string read_secret_file(const std::string& path, const std::string& key,
                             const std::string& what) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw std::runtime_error(key + " " + path + ": cannot read it: " + std::strerror(errno));
  }
  struct stat status {};
  if (::fstat(fd, &status) != 0 || !S_ISREG(status.st_mode)) {
    ::close(fd);
    throw std::runtime_error(key + " " + path + ": not a regular file");
  }
  if ((status.st_mode & (S_IRGRP | S_IROTH)) != 0) {
    ::close(fd);
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(status.st_mode & 07777));
    throw std::runtime_error(key + " " + path + ": mode " + mode +
                             " lets group or others read the " + what +
                             "; make it readable by "
                             "its owner only (chmod 600 " +
                             path + ")");
  }
  std::string content;
  char buffer[4096];
  for (;;) {
    const ssize_t got = ::read(fd, buffer, sizeof buffer);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int error = errno;
      ::close(fd);
      throw std::runtime_error(key + " " + path + ": cannot read it: " + std::strerror(error));
    }
    if (got == 0) break;
    content.append(buffer, static_cast<std::size_t>(got));
    if (content.find('\n') != std::string::npos || content.size() > 64 * 1024) break;
  }
  ::close(fd);
  // The first line, without its end: LF, or CR LF from a file written on Windows.
  std::string password = content.substr(0, content.find('\n'));
  while (!password.empty() && (password.back() == '\r' || password.back() == '\n')) {
    password.pop_back();
  }
  return password;
}

std::string lower(std::string_view text) {
  std::string out(text);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

// Whether `domain` is `parent` (lower case) or one of its subdomains, ASCII case ignored.
bool in_domain(std::string_view domain, std::string_view parent) {
  if (http::iequals(domain, parent)) return true;
  return domain.size() > parent.size() &&
         http::iequals(domain.substr(domain.size() - parent.size()), parent) &&
         domain[domain.size() - parent.size() - 1] == '.';
}

struct Refusal {
  int status;
  std::string field;
  std::string message;
};

// The sender and recipient policy: a token may send from the default sender and from the
// addresses and domains its tokens-file line lists (an anonymous caller from the default only);
// recipients must pass [policy]. A refusal names the field. The addresses were validated with
// the request; the settings they are compared with are lower case (config and tokens file), so
// comparisons ignore ASCII case instead of lowering a copy of each address.
std::optional<Refusal> check_policy(const mail::EmailRequestView& email, const Caller& caller,
                                    const PolicyConfig& policy,
                                    std::string_view default_from_address) {
  if (!email.from.empty()) {
    const std::string_view from = mail::bare_address(email.from);
    const std::string_view domain = from.substr(from.rfind('@'));  // "@example.com"
    bool allowed = http::iequals(from, default_from_address);
    if (caller.token != nullptr) {
      for (const std::string& sender : caller.token->senders) {
        if (http::iequals(from, sender) || http::iequals(domain, sender)) allowed = true;
      }
    }
    if (!allowed) {
      return Refusal{403, "from",
                     caller.token != nullptr
                         ? "token " + caller.token->name + " may not send from " + lower(from) +
                               " (its from= list in [auth] tokens_file)"
                         : "callers without a token may only send from [smtp] from"};
    }
  }
  if (policy.ip_literal_recipients && policy.blocked_recipient_domains.empty() &&
      policy.recipient_domains.empty()) {
    return std::nullopt;  // Every valid recipient passes.
  }
  const std::pair<const char*, std::span<const std::string_view>> lists[] = {
      {"to", email.to}, {"cc", email.cc}, {"bcc", email.bcc}};
  for (const auto& [field, list] : lists) {
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string_view recipient = mail::bare_address(list[i]);
      const std::string_view domain = recipient.substr(recipient.rfind('@') + 1);
      const auto name = [&, field = field] {
        return std::string(field) + "[" + std::to_string(i) + "]";
      };
      if (!domain.empty() && domain.front() == '[') {
        if (!policy.ip_literal_recipients) {
          return Refusal{400, name(),
                         "IP-literal recipients are not allowed ([policy] "
                         "ip_literal_recipients)"};
        }
        continue;
      }
      for (const std::string& blocked : policy.blocked_recipient_domains) {
        if (in_domain(domain, blocked)) {
          return Refusal{400, name(),
                         "the domain " + lower(domain) +
                             " is not allowed ([policy] blocked_recipient_domains)"};
        }
      }
      if (!policy.recipient_domains.empty() &&
          std::none_of(policy.recipient_domains.begin(), policy.recipient_domains.end(),
                       [&](const std::string& allowed) { return in_domain(domain, allowed); })) {
        return Refusal{
            400, name(),
            "the domain " + lower(domain) + " is not allowed ([policy] recipient_domains)"};
      }
    }
  }
  return std::nullopt;
}

// The password comes from a file or the environment and never appears in a log line.
std::string resolve_password(const SmtpConfig& smtp) {
  if (!smtp.password_file.empty())
    return read_secret_file(smtp.password_file, "[smtp] password_file", "password");
  if (!smtp.password_env.empty()) {
    const char* value = std::getenv(smtp.password_env.c_str());
    if (value == nullptr) {
      throw std::runtime_error("[smtp] password_env: the environment variable " +
                               smtp.password_env + " is not set");
    }
    return value;
  }
  return {};
}

mail::SmtpSettings smtp_settings(const SmtpConfig& smtp) {
  mail::SmtpSettings settings = smtp;  // The relay's settings, as configured.
  settings.password = resolve_password(smtp);
  if (!smtp.ca_file.empty()) {
    // Checked now rather than as a TLS failure on every send.
    std::ifstream ca(smtp.ca_file);
    if (!ca) {
      throw std::runtime_error("[smtp] ca_file " + smtp.ca_file +
                               ": cannot read it: " + std::strerror(errno));
    }
  }
  return settings;
}

// Jobs held ahead of their sends, per send that can run at once: a claim is a commit, and a
// commit (an fsync) plus the commit delay last as long as many sends over a kept connection,
// so each claim takes enough for the sends that finish until the next one.
constexpr std::size_t kPrefetchPerSend = 16;
// How long the runner lets starts and outcomes gather before it commits them: a few sends'
// time, so one fsync carries dozens of them instead of two or three. It delays a "sent" (and
// its webhook) by at most this; a free slot with no job waiting claims at once.
constexpr std::chrono::milliseconds kCommitDelay{10};

// [jobs] as the runner takes it. The prefetch follows the sends that can run at once: the
// smaller of max_concurrent_sends and the relay connections (a Maildir has no connections).
jobs::RunnerOptions runner_options(const Config& config) {
  jobs::RunnerOptions options = config.jobs;
  std::size_t sends = config.jobs.max_concurrent;
  if (!config.smtp.url.starts_with(mail::maildir_scheme)) {
    sends = std::min(sends, config.smtp.connections);
  }
  options.prefetch = kPrefetchPerSend * std::max<std::size_t>(sends, 1);
  options.commit_delay = kCommitDelay;
  return options;
}

}  // namespace

// Everything a reload may change, swapped whole so a send in progress keeps its own copy.
struct JobsService::Settings {
  mail::EmailLimits limits;                        // For POST /email validation.
  std::size_t max_queued = 0;                      // Back-pressure threshold.
  std::size_t max_queued_bytes = 0;                // [jobs] max_queued_bytes.
  std::size_t max_queued_per_client = 0;           // [quota] max_queued_per_client.
  PolicyConfig policy;                             // Recipient domains, IP literals.
  std::string default_from_address;                // [smtp] from's address, lower case.
  std::string default_from;                        // [smtp] from.
  std::string message_id_domain;                   // The domain of default_from.
  std::shared_ptr<const mail::SmtpMailer> mailer;  // Libcurl settings, for smtp:// and smtps://.
  std::shared_ptr<const mail::MaildirWriter> maildir;  // For maildir:PATH, instead of the relay.
  std::chrono::milliseconds retain{0};                 // [jobs] retain.
};

JobsService::JobsService(Loop& loop, const Config& config, metrics::Registry& registry)
    : loop_(loop), alive_(std::make_shared<bool>(true)) {
  // libuv's pool got its size from this config (UV_THREADPOOL_SIZE) and keeps it until exit.
  running_pool_size_ = config.server.thread_pool_size;
  reconfigure(config);
  const bool synchronous_full = config.jobs.durability == Durability::full;
  // A postgresql:// URL: one queue shared by every node on that database; otherwise a file.
  shared_store_ = jobs::is_postgresql_url(config.jobs.store);
  store_url_ = config.jobs.store;
  const auto open_store = [&] {
    return shared_store_ ? jobs::open_postgresql_store(config.jobs.store, synchronous_full)
                         : jobs::open_sqlite_store(config.jobs.store, synchronous_full);
  };
  auto store = open_store();
  // The shares of the jobs already waiting, read before the loop runs and so before the first
  // request: read later, on the store thread, a restart left a window in which a client could
  // exceed its share. (On PostgreSQL they are read again every few seconds: other nodes insert.)
  adopt_store_usage(store->pending_by_owner());
  store_ = std::make_unique<jobs::StoreWorker>(
      std::move(store),
      [&loop](std::function<void()> callback) { loop.call_soon(std::move(callback)); });
  stats_reader_ = open_store();
  // After the store opened, so that a missing directory or a foreign file is reported as such.
  // PostgreSQL needs no lock file: each node's advisory lock tells the others when it is gone.
  std::string lock_holder;
  if (!shared_store_) {
    store_lock_.emplace(jobs::StoreLock::try_acquire(config.jobs.store, lock_holder));
  }
  if (store_lock_ && !store_lock_->acquired()) {
    spdlog::warn(
        "jobs: another process (pid {}) uses the job store {}: jobs it is sending are left to "
        "their lease",
        lock_holder.empty() ? "unknown" : lock_holder, config.jobs.store);
  }
  runner_ = std::make_unique<jobs::JobRunner>(
      loop, *store_, runner_options(config),
      [this](const jobs::Job& job) -> std::function<jobs::AttemptResult()> {
        // Runs on the loop: capture the settings current now; the work runs on the pool.
        const auto settings = settings_;
        return [settings, job, cancel = runner_->cancel_flag()] {
          const mail::Email email = mail::email_from_json(job.payload);
          const std::string message_id = mail::make_message_id(job.id, settings->message_id_domain);
          const auto now = std::chrono::system_clock::now();
          mail::SendResult sent;
          if (settings->maildir) {
            sent = settings->maildir->deliver(
                job.id, job.created_ms,
                mail::build_mime(email, settings->default_from, message_id, now));
          } else {
            // The headers and the envelope from one parse of each address.
            const mail::OutgoingMessage message =
                mail::prepare_message(email, settings->default_from, message_id, now);
            sent = settings->mailer->send(message.sender, message.recipients, message.mime, cancel);
          }
          using Outcome = jobs::AttemptResult::Outcome;
          switch (sent.outcome) {
            case mail::SendOutcome::aborted:
              return jobs::AttemptResult{Outcome::aborted, sent.detail};
            case mail::SendOutcome::sent:
              return jobs::AttemptResult{Outcome::done, sent.detail};
            case mail::SendOutcome::permanent_failure:
              return jobs::AttemptResult{Outcome::permanent_failure, sent.detail};
            case mail::SendOutcome::temporary_failure:
              break;
          }
          return jobs::AttemptResult{Outcome::temporary_failure, sent.detail};
        };
      },
      [this](const jobs::Job& job, const jobs::AttemptResult&, std::chrono::nanoseconds took,
             bool finished) {
        send_seconds_->observe(std::chrono::duration<double>(took).count());
        if (finished) release(job.owner, static_cast<std::int64_t>(job.payload.size()));
        if (finished && webhooks_) webhooks_->poke();
      });

  // The counts survive restarts: the store knows what is still waiting, and whose it is.
  if (!config.webhooks.url.empty()) {
    WebhookSettings webhook;
    webhook.url = config.webhooks.url;
    webhook.secret =
        read_secret_file(config.webhooks.secret_file, "[webhooks] secret_file", "secret");
    if (webhook.secret.empty()) {
      throw std::runtime_error("[webhooks] secret_file " + config.webhooks.secret_file +
                               ": its first line (the signing key) is empty");
    }
    webhook.timeout = config.webhooks.timeout;
    webhook.max_attempts = static_cast<int>(config.webhooks.max_attempts);
    // Before any job can finish: from now on finishing a job makes its webhook owed.
    store_->run([](jobs::JobStore& store) { store.set_webhooks(true); });
    webhooks_ = std::make_unique<WebhookDispatcher>(
        loop, *store_, std::move(webhook),
        [](const jobs::Job& job, std::string_view event_id, std::string_view type) {
          nlohmann::json body = job_json(job);
          body["event_id"] = event_id;
          body["type"] = type;
          return body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
        },
        registry);
    spdlog::info("jobs: webhooks go to {} ([webhooks] url)", config.webhooks.url);
  }

  if (store_lock_ && store_lock_->acquired()) {
    // No other process of this node uses the store: whatever is `sending` was being sent by a
    // process that is gone (kill -9, a crash). Due at once rather than after its lease.
    store_->run([](jobs::JobStore& store) {
      const std::size_t expired = store.expire_all_leases(jobs::unix_now_ms());
      if (expired > 0) {
        spdlog::warn(
            "jobs: {} job(s) were being sent when the previous process stopped: they are "
            "sent again now (a receiver may get such a mail twice, with the same Message-ID)",
            expired);
      }
    });
  }

  auto& by_state = registry.gauge("squall_jobs",
                                  "Jobs in the store by state (refreshed every "
                                  "few seconds).",
                                  {"state"});
  for (std::size_t i = 0; i < by_state_gauges_.size(); ++i) {
    by_state_gauges_[i] = &by_state.with({jobs::to_string(static_cast<jobs::JobState>(i))});
  }
  registry.gauge_callback("squall_jobs_queue_depth",
                          "Jobs accepted and not yet sent or failed (incl. inserts in flight).",
                          [this] { return static_cast<double>(pending_); });
  registry.gauge_callback("squall_jobs_oldest_pending_age_seconds",
                          "Age of the oldest job still waiting to be sent.", [this] {
                            if (oldest_pending_ms_ == 0) return 0.0;
                            return static_cast<double>(jobs::unix_now_ms() - oldest_pending_ms_) /
                                   1000;
                          });
  registry.counter_callback("squall_jobs_attempts_total", "Send attempts started.",
                            [this] { return runner_->stats().attempts; });
  registry.counter_callback("squall_jobs_retries_total", "Attempts that ended in a retry.",
                            [this] { return runner_->stats().retries; });
  registry.counter_callback("squall_jobs_sent_total", "Jobs sent.",
                            [this] { return runner_->stats().done; });
  registry.counter_callback("squall_jobs_failed_total", "Jobs failed for good.",
                            [this] { return runner_->stats().failed; });
  registry.counter_callback(
      "squall_jobs_runner_commits_total",
      "Transactions the send runner committed (each: attempts begun, outcomes, next claim).",
      [this] { return runner_->stats().rounds; });
  registry.counter_callback("squall_jobs_claimed_total",
                            "Jobs the send runner claimed (held for an attempt).",
                            [this] { return runner_->stats().held; });
  registry.gauge_callback("squall_jobs_sends_running", "Sends on the thread pool now.",
                          [this] { return static_cast<double>(runner_->stats().running); });
  registry.gauge_callback("squall_jobs_store_failing",
                          "1 while the job store refuses writes (POST /email answers 503).",
                          [this] { return store_failing_ ? 1.0 : 0.0; });
  registry.counter_callback("squall_jobs_purged_total",
                            "Finished jobs deleted after [jobs] retain.",
                            [this] { return purged_total_; });
  registry.gauge_callback("squall_jobs_store_queue_depth",
                          "Operations waiting for the job store's thread.",
                          [this] { return static_cast<double>(store_->queue_depth()); });
  // Group commit: inserts / commits is how many accepts share one commit (and its fsync).
  registry.counter_callback("squall_jobs_store_insert_commits_total",
                            "Commits of accepted jobs (each stores every insert queued by then).",
                            [this] { return store_->batches_committed(); });
  registry.counter_callback("squall_jobs_store_inserts_total",
                            "Accepted jobs committed to the store, in all those commits.",
                            [this] { return store_->inserts_committed(); });
  // The SQLite store's WAL (zero on PostgreSQL): its checkpoint thread keeps checkpoints out
  // of the commits.
  registry.counter_callback("squall_jobs_store_checkpoints_total",
                            "WAL checkpoints run by the job store's checkpoint thread.",
                            [this] { return store_->checkpoint_stats().checkpoints; });
  registry.counter_callback("squall_jobs_store_checkpoint_pages_total",
                            "WAL pages the job store's checkpoint thread copied into the database.",
                            [this] { return store_->checkpoint_stats().pages; });
  registry.counter_callback(
      "squall_jobs_store_commit_checkpoints_total",
      "WAL checkpoints run by the job store's commits (the last pages before the WAL starts "
      "over, or all of them past its bound).",
      [this] { return store_->checkpoint_stats().commit_checkpoints; });
  registry.counter_callback(
      "squall_jobs_store_commit_checkpoints_over_bound_total",
      "Of the commits' WAL checkpoints, those run because the WAL reached its bound.",
      [this] { return store_->checkpoint_stats().commit_checkpoints_over_bound; });
  registry.counter_callback("squall_jobs_store_commit_checkpoint_pages_total",
                            "WAL pages the job store's commits copied into the database.",
                            [this] { return store_->checkpoint_stats().commit_pages; });
  registry.counter_callback("squall_jobs_store_wal_restarts_total",
                            "Commits that began the job store's WAL again from its start.",
                            [this] { return store_->checkpoint_stats().wal_restarts; });
  registry.counter_callback("squall_jobs_store_checkpoint_failures_total",
                            "WAL checkpoints of the job store that failed (logged).",
                            [this] { return store_->checkpoint_stats().failures; });
  send_seconds_ =
      &registry
           .histogram("squall_jobs_send_duration_seconds", "Duration of one send attempt.",
                      {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60})
           .get();
}

JobsService::~JobsService() {
  notifier_.reset();  // Its thread calls into the loop: stopped first.
  *alive_ = false;
  webhooks_.reset();
  runner_.reset();
  if (store_) store_->stop();
  stats_timer_.reset();
  housekeeping_timer_.reset();
}

void JobsService::start() {
  runner_->start();
  if (shared_store_) {
    // Other nodes' inserts (and releases) wake this node's runner at once; polling stays, for
    // jobs whose retry comes due and for the time the notifier is not connected.
    std::weak_ptr<bool> alive = alive_;
    notifier_ = std::make_unique<jobs::JobNotifier>(store_url_, [this, alive, &loop = loop_] {
      loop.call_soon([this, alive] {
        const auto still = alive.lock();
        if (still && *still && accepting_) runner_->poke();
      });
    });
  }
  if (webhooks_) webhooks_->start();
  stats_timer_ = UvHandle<uv_timer_t>(loop_, this, uv_timer_init, "job statistics timer");
  arm_stats_timer(std::chrono::milliseconds(0));
  // Statistics alone must not keep the loop running.
  uv_unref(stats_timer_.handle());

  housekeeping_timer_ = UvHandle<uv_timer_t>(loop_, this, uv_timer_init, "job housekeeping timer");
  next_purge_ms_ = jobs::unix_now_ms();
  uv_timer_start(
      housekeeping_timer_.get(),
      [](uv_timer_t* timer) { static_cast<JobsService*>(timer->data)->housekeeping(); }, 0, 1000);
  uv_unref(housekeeping_timer_.handle());
}

void JobsService::store_failed(const std::string& what, const std::string& error) {
  if (!store_failing_) {
    spdlog::error(
        "jobs: the job store is failing ({} failed: {}); POST /email answers 503 and "
        "/healthz reports it until a write succeeds",
        what, error);
  }
  store_failing_ = true;
}

void JobsService::store_worked() {
  if (store_failing_) spdlog::info("jobs: the job store accepts writes again");
  store_failing_ = false;
}

void JobsService::housekeeping() {
  ++housekeeping_ticks_;
  if (!probe_in_flight_ && (store_failing_ || housekeeping_ticks_ % kProbeEvery == 0)) {
    probe_in_flight_ = true;
    std::weak_ptr<bool> alive = alive_;
    const bool queued = store_->run([this, alive, &loop = loop_](jobs::JobStore& store) {
      std::string error;
      try {
        store.probe_write(jobs::unix_now_ms());
      } catch (const std::exception& failure) {
        error = failure.what();
      }
      loop.call_soon([this, alive, error] {
        const auto still = alive.lock();
        if (!still || !*still) return;
        probe_in_flight_ = false;
        if (error.empty()) {
          store_worked();
        } else {
          store_failed("a probe write", error);
        }
      });
    });
    if (!queued) probe_in_flight_ = false;
  }
  const std::int64_t now = jobs::unix_now_ms();
  if (!purge_in_flight_ && now >= next_purge_ms_) {
    const auto retain = settings_->retain;
    // A tenth of the retention, between a second and a minute: jobs live at most about
    // 110% of it.
    const auto period = std::clamp<std::int64_t>(retain.count() / 10, 1000, 60'000);
    next_purge_ms_ = now + period;
    purge(now - retain.count(), true, std::numeric_limits<std::int64_t>::max());
  }
}

void JobsService::purge(std::int64_t finished_before_ms, bool vacuum_only_if_purged,
                        std::int64_t free_pages_before) {
  purge_in_flight_ = true;
  std::weak_ptr<bool> alive = alive_;
  const bool queued = store_->run([this, alive, finished_before_ms, vacuum_only_if_purged,
                                   free_pages_before, &loop = loop_](jobs::JobStore& store) {
    std::size_t purged = 0;
    std::int64_t free_pages = -1;  // Not compacted this round.
    std::string error;
    try {
      purged = store.purge_finished(finished_before_ms, kPurgeBatch);
      if (purged > 0 || !vacuum_only_if_purged) free_pages = store.compact(kCompactPages);
    } catch (const std::exception& failure) {
      error = failure.what();
    }
    loop.call_soon([this, alive, finished_before_ms, purged, free_pages, free_pages_before, error] {
      const auto still = alive.lock();
      if (!still || !*still) return;
      purge_in_flight_ = false;
      if (!error.empty()) {
        spdlog::error("jobs: deleting jobs older than [jobs] retain failed: {}", error);
        return;
      }
      purged_total_ += purged;
      if (purged > 0) spdlog::debug("jobs: {} finished job(s) past [jobs] retain deleted", purged);
      // More to delete, or free pages left to give back: another round, behind the inserts
      // that queued meanwhile.
      const bool compacting = free_pages > 0 && free_pages < free_pages_before;
      if (accepting_ && (purged == kPurgeBatch || compacting)) {
        purge(finished_before_ms, purged == kPurgeBatch,
              free_pages >= 0 ? free_pages : free_pages_before);
      }
    });
  });
  if (!queued) purge_in_flight_ = false;
}

void JobsService::arm_stats_timer(std::chrono::milliseconds delay) {
  if (!stats_timer_.is_open()) return;
  // One-shot: each read arms the next one.
  uv_timer_start(
      stats_timer_.get(),
      [](uv_timer_t* timer) { static_cast<JobsService*>(timer->data)->refresh_stats(); },
      static_cast<std::uint64_t>(delay.count()), 0);
}

void JobsService::refresh_stats() {
  if (stats_in_flight_ || stats_reader_ == nullptr) return;
  stats_in_flight_ = true;
  // A second connection, read on the pool: WAL lets it read while the worker writes, so the
  // counts (a scan of the table) never hold up an insert.
  struct Read {
    jobs::StoreStats stats;
    // Shared store: other nodes accept and finish jobs too, so the queue bounds are read back
    // from the store (plus this node's inserts in flight) instead of counted here alone.
    std::vector<jobs::OwnerUsage> owners;
    std::chrono::nanoseconds took{0};  // What the reads cost (0 if they failed).
  };
  auto read = std::make_shared<Read>();
  std::weak_ptr<bool> alive = alive_;
  loop_.run_blocking(
      [reader = stats_reader_, read, shared = shared_store_] {
        const auto started = std::chrono::steady_clock::now();
        read->stats = reader->stats(jobs::unix_now_ms());
        if (shared) read->owners = reader->pending_by_owner();
        read->took = std::chrono::steady_clock::now() - started;
      },
      [this, alive, read](std::exception_ptr error) {
        const auto still = alive.lock();
        if (!still || !*still) return;
        stats_in_flight_ = false;
        if (accepting_) arm_stats_timer(next_stats_read(read->took));  // drain() stopped it.
        if (error) {
          try {
            std::rethrow_exception(error);
          } catch (const std::exception& failure) {
            spdlog::error("jobs: reading store statistics failed: {}", failure.what());
          }
          return;
        }
        for (std::size_t i = 0; i < by_state_gauges_.size(); ++i) {
          by_state_gauges_[i]->set(static_cast<double>(read->stats.by_state[i]));
        }
        oldest_pending_ms_ = read->stats.oldest_queued_ms;
        if (shared_store_) adopt_store_usage(read->owners);
      });
}

void JobsService::reconfigure(const Config& config) {
  auto settings = std::make_shared<Settings>();
  settings->limits = static_cast<const mail::EmailLimits&>(config.jobs);
  settings->max_queued = config.jobs.max_queued;
  settings->max_queued_bytes = config.jobs.max_queued_bytes;
  settings->max_queued_per_client = config.quota.max_queued_per_client;
  settings->policy = config.policy;
  settings->default_from = config.smtp.from;
  const auto sender = mail::parse_address(config.smtp.from);
  if (const auto* problem = std::get_if<std::string>(&sender)) {
    throw std::runtime_error("[smtp] from \"" + config.smtp.from + "\": " + *problem);
  }
  const std::string& address = std::get<mail::Address>(sender).addr_spec;
  settings->default_from_address = lower(address);
  settings->message_id_domain = address.substr(address.rfind('@') + 1);
  if (config.smtp.url.starts_with(mail::maildir_scheme)) {
    auto maildir = std::make_shared<const mail::MaildirWriter>(
        config.smtp.url.substr(mail::maildir_scheme.size()));
    maildir->create_directories();
    const bool changed = !settings_ || !settings_->maildir ||
                         settings_->maildir->directory() != maildir->directory();
    if (changed) {
      spdlog::info("jobs: mail is written to the Maildir {} ([smtp] url), not sent to a relay",
                   maildir->directory());
    }
    settings->maildir = std::move(maildir);
  } else {
    auto smtp = smtp_settings(config.smtp);
    // Unchanged settings keep the mailer, and with it the connections it holds open.
    if (settings_ && settings_->mailer && settings_->mailer->settings() == smtp) {
      settings->mailer = settings_->mailer;
    } else {
      settings->mailer = std::make_shared<const mail::SmtpMailer>(std::move(smtp));
    }
  }
  settings->retain = config.jobs.retain;
  if (config.jobs.max_concurrent >= running_pool_size_) {
    throw std::runtime_error(
        "[jobs] max_concurrent_sends (" + std::to_string(config.jobs.max_concurrent) +
        ") must be below the running thread pool's size (" + std::to_string(running_pool_size_) +
        "): a new [server] thread_pool_size takes effect only at the next restart");
  }
  if (settings->mailer && !config.smtp.tls_verify) {
    spdlog::warn(
        "[smtp] tls_verify = false: the certificate of the relay {} is NOT verified; anyone on "
        "the network path can pose as it and read every email{}",
        settings->mailer->display_url(),
        config.smtp.username.empty() ? "" : " and the SMTP password");
  }
  settings_ = std::move(settings);
  if (runner_) runner_->reconfigure(runner_options(config));
  // New limiters only when the rates change: a reload must not refill every bucket.
  if (!token_rate_ || config.quota.token_per_minute != rates_in_use_.token_per_minute ||
      config.quota.token_burst != rates_in_use_.token_burst) {
    token_rate_ =
        std::make_unique<KeyedRateLimiter>(static_cast<double>(config.quota.token_per_minute),
                                           static_cast<double>(config.quota.token_burst));
  }
  if (!address_rate_ || config.quota.address_per_minute != rates_in_use_.address_per_minute ||
      config.quota.address_burst != rates_in_use_.address_burst) {
    address_rate_ =
        std::make_unique<KeyedRateLimiter>(static_cast<double>(config.quota.address_per_minute),
                                           static_cast<double>(config.quota.address_burst));
  }
  rates_in_use_ = config.quota;
}

JobCall JobCall::owned() const {
  auto bytes = std::make_shared<std::string>();
  bytes->reserve(content_type.size() + idempotency_key.size() + remote_address.size() +
                 body.size() + id.size());
  JobCall copy{access, caller, {}, {}, {}, {}, {}, nullptr};
  // Appended first, viewed once no append can move the bytes any more.
  std::size_t offsets[5];
  const std::string_view* fields[5] = {&content_type, &idempotency_key, &remote_address, &body,
                                       &id};
  for (std::size_t i = 0; i < 5; ++i) {
    offsets[i] = bytes->size();
    bytes->append(*fields[i]);
  }
  std::string_view* views[5] = {&copy.content_type, &copy.idempotency_key, &copy.remote_address,
                                &copy.body, &copy.id};
  for (std::size_t i = 0; i < 5; ++i) {
    *views[i] = std::string_view(*bytes).substr(offsets[i], fields[i]->size());
  }
  copy.storage = std::move(bytes);
  return copy;
}

void JobsService::add_routes(http::Router& router, const Config& config,
                             std::shared_ptr<const AccessControl> access, AnswerDesk& desk) {
  // The token is checked on the loop that received the request; what the job routes need of
  // it is viewed in a JobCall and handled on this service's loop, through `desk`: at once when
  // that is the receiving loop, or copied (JobCall::owned) and posted there otherwise.
  if (config.routes.email) {
    router.add("POST", "/email",
               [this, access, &desk](http::Request& request, http::Responder responder) {
                 const auto caller = access->authenticate(request, responder);
                 if (!caller) return;
                 const JobCall call{access,
                                    *caller,
                                    request.header("content-type").value_or(""),
                                    request.header("idempotency-key").value_or(""),
                                    request.remote_address(),
                                    request.body(),
                                    {},
                                    nullptr};
                 if (desk.primary()) {
                   // Run at once, on this loop, while the request lives: nothing is copied.
                   desk.on_primary(
                       responder, [this, &call](const Reply& reply) { accept_email(call, reply); });
                   return;
                 }
                 desk.on_primary(responder, [this, call = call.owned()](const Reply& reply) {
                   accept_email(call, reply);
                 });
               });
  }
  if (config.routes.jobs) {
    router.add("GET", "/jobs/{id}",
               [this, access, &desk](http::Request& request, http::Responder responder) {
                 const auto caller = access->authenticate(request, responder);
                 if (!caller) return;
                 const JobCall call{access, *caller, {}, {}, {}, {}, request.param("id"), nullptr};
                 if (desk.primary()) {
                   desk.on_primary(responder,
                                   [this, &call](const Reply& reply) { report_job(call, reply); });
                   return;
                 }
                 desk.on_primary(responder, [this, call = call.owned()](const Reply& reply) {
                   report_job(call, reply);
                 });
               });
  }
}

void JobsService::adopt_store_usage(const std::vector<jobs::OwnerUsage>& stored) {
  // The store's counts plus the inserts not answered yet. Replaced, not added: an insert that
  // was reserved here and committed before the store was read is in the counts already (the
  // StoreWorker commits waiting inserts before the operations queued ahead of them).
  usage_ = inflight_;
  pending_ = pending_bytes_ = 0;
  for (const auto& [owner, share] : inflight_) {
    pending_ += share.jobs;
    pending_bytes_ += share.bytes;
  }
  for (const jobs::OwnerUsage& owner : stored) {
    pending_ += owner.jobs;
    pending_bytes_ += owner.bytes;
    Usage& share = usage_[owner.owner];
    share.jobs += owner.jobs;
    share.bytes += owner.bytes;
  }
}

void JobsService::reserve(const std::string& owner, std::int64_t bytes) {
  ++pending_;
  pending_bytes_ += bytes;
  Usage& share = usage_[owner];
  ++share.jobs;
  share.bytes += bytes;
}

void JobsService::release(const std::string& owner, std::int64_t bytes) {
  --pending_;
  pending_bytes_ -= bytes;
  const auto found = usage_.find(owner);
  if (found == usage_.end()) return;
  --found->second.jobs;
  found->second.bytes -= bytes;
  if (found->second.jobs <= 0) usage_.erase(found);
}

bool JobsService::within_rate(const JobCall& call, const Reply& reply) {
  const auto now = KeyedRateLimiter::Clock::now();
  std::chrono::milliseconds wait{0};
  std::string_view limit;
  if (!address_rate_->try_take(client_rate_key(call.remote_address), now, wait)) {
    limit = "[quota] address_per_minute";
  } else if (call.caller.token != nullptr &&
             !token_rate_->try_take(call.caller.token->name, now, wait)) {
    limit = "[quota] token_per_minute";
  } else {
    return true;
  }
  const auto seconds = std::max<std::int64_t>(1, (wait.count() + 999) / 1000);
  send_error(reply, 429, "", "too many requests (" + std::string(limit) + ")",
             {{"Retry-After", std::to_string(seconds)}});
  return false;
}

void JobsService::accept_email(const JobCall& call, const Reply& reply) {
  if (!accepting_) {
    send_error(reply, 503, "", "shutting down: not accepting jobs", {{"Retry-After", "5"}});
    return;
  }
  // application/json only: a form or text/plain body is what a web page can send cross-site
  // without a CORS preflight, so anything else (no Content-Type included) is refused. The
  // media type is case-insensitive and may carry parameters (charset=utf-8).
  std::string_view media_type = call.content_type;
  media_type = media_type.substr(0, media_type.find(';'));
  while (!media_type.empty() && (media_type.back() == ' ' || media_type.back() == '\t')) {
    media_type.remove_suffix(1);
  }
  if (!http::iequals(media_type, kJsonType)) {
    send_error(
        reply, 415, "Content-Type",
        media_type.empty() ? "missing; expected application/json" : "expected application/json");
    return;
  }
  if (!within_rate(call, reply)) return;
  const std::string_view key = call.idempotency_key;
  if (key.size() > kMaxIdempotencyKeyBytes) {
    send_error(reply, 400, "Idempotency-Key",
               "longer than " + std::to_string(kMaxIdempotencyKeyBytes) + " bytes");
    return;
  }
  const auto settings = settings_;
  if (auto error = email_parser_.parse(call.body, settings->limits)) {
    send_error(reply, 400, error->field, error->message);
    return;
  }
  if (const auto refusal = check_policy(email_parser_.request(), call.caller, settings->policy,
                                        settings->default_from_address)) {
    send_error(reply, refusal->status, refusal->field, refusal->message);
    return;
  }
  std::string& payload = email_parser_.payload();
  const auto bytes = static_cast<std::int64_t>(payload.size());
  const std::string owner = call.caller.owner();
  if (pending_ >= static_cast<std::int64_t>(settings->max_queued)) {
    send_error(reply, 503, "", "the job queue is full ([jobs] max_queued)", {{"Retry-After", "5"}});
    return;
  }
  if (pending_bytes_ + bytes > static_cast<std::int64_t>(settings->max_queued_bytes)) {
    send_error(reply, 503, "", "the job queue is full ([jobs] max_queued_bytes)",
               {{"Retry-After", "5"}});
    return;
  }
  if (const auto found = usage_.find(owner);
      found != usage_.end() &&
      found->second.jobs >= static_cast<std::int64_t>(settings->max_queued_per_client)) {
    send_error(reply, 429, "", "too many of your jobs are waiting ([quota] max_queued_per_client)",
               {{"Retry-After", "30"}});
    return;
  }
  reserve(owner, bytes);
  Usage& inflight = inflight_[owner];
  ++inflight.jobs;
  inflight.bytes += bytes;
  // Only a request with an Idempotency-Key can meet an earlier job, whose payload it is then
  // compared with: only then is a copy of the payload kept. The payload itself moves to the
  // store thread.
  std::string keyed_payload = key.empty() ? std::string() : payload;
  jobs::NewJob job{"email", std::move(payload), std::string(key), owner};
  std::weak_ptr<bool> alive = alive_;
  // The callback runs on the loop, but the worker thread holds (and moves) it until then: it
  // carries the Reply (a ticket on the receiving loop), never a Responder.
  store_->insert(
      std::move(job), [this, alive, reply, owner, bytes, payload = std::move(keyed_payload)](
                          std::variant<jobs::Inserted, std::string> outcome) {
        const auto still = alive.lock();
        if (!still || !*still) return;
        if (const auto found = inflight_.find(owner); found != inflight_.end()) {
          --found->second.jobs;
          found->second.bytes -= bytes;
          if (found->second.jobs <= 0) inflight_.erase(found);
        }
        if (const auto* error = std::get_if<std::string>(&outcome)) {
          release(owner, bytes);
          spdlog::error("jobs: storing an email job failed: {}", *error);
          store_failed("storing a job", *error);
          // The store's trouble (a full disk, a lock, an I/O error) is usually passing: the
          // client may try again, and nothing was stored.
          send_error(reply, 503, "", "the job store cannot take the job now; nothing was stored",
                     {{"Retry-After", std::string(kStoreRetryAfter)}});
          return;
        }
        store_worked();
        const auto& inserted = std::get<jobs::Inserted>(outcome);
        if (!inserted.created) {
          release(owner, bytes);  // A repeat of an earlier request: nothing new.
          // Digests: a sent job's payload itself is deleted.
          if (inserted.job.payload_digest != jobs::payload_digest(payload)) {
            // The key was used for a different email: answering with that job would mislead.
            send_error(reply, 422, "Idempotency-Key",
                       "already used for a different request (job " + inserted.job.id + ")");
            return;
          }
        }
        send_accepted(reply, inserted.created ? 202 : 200, inserted.job);
        if (inserted.created) runner_->poke();
      });
}

void JobsService::report_job(const JobCall& call, const Reply& reply) {
  std::string id(call.id);
  std::weak_ptr<bool> alive = alive_;
  // Only data crosses to the store thread and back; the Responder stays parked on its loop.
  const bool queued = store_->run([this, alive, id, reply, owner = call.caller.owner(),
                                   &loop = loop_](jobs::JobStore& store) {
    std::optional<jobs::Job> job;
    std::string error;
    try {
      job = store.get(id);
    } catch (const std::exception& failure) {
      error = failure.what();
    }
    loop.call_soon([this, alive, id, reply, owner, job = std::move(job), error]() mutable {
      const auto still = alive.lock();
      if (!still || !*still) return;
      if (job && (job->state == jobs::JobState::queued || job->state == jobs::JobState::retrying) &&
          runner_->attempting(job->id)) {
        // Its attempt began after a prefetch held it; the store learns that with the
        // runner's next commit. Shown as the store will show it then.
        job->state = jobs::JobState::sending;
        ++job->attempts;
      }
      if (!error.empty()) {
        spdlog::error("jobs: reading job {} failed: {}", id, error);
        send_error(reply, 503, "", "the job store cannot be read now",
                   {{"Retry-After", std::string(kStoreRetryAfter)}});
      } else if (!job || job->owner != owner) {
        // Another owner's job is answered exactly like a missing one.
        send_error(reply, 404, "id", "no such job");
      } else {
        send_json(reply, 200, job_json(*job));
      }
    });
  });
  if (!queued) {
    send_error(reply, 503, "", "shutting down: the job store is closed", {{"Retry-After", "5"}});
  }
}

void JobsService::drain(std::function<void()> done) {
  accepting_ = false;
  if (stats_timer_.is_open()) uv_timer_stop(stats_timer_.get());
  if (housekeeping_timer_.is_open()) uv_timer_stop(housekeeping_timer_.get());
  if (webhooks_) webhooks_->drain();
  runner_->drain(std::move(done));
}

void JobsService::abort_sends() {
  if (runner_->stats().running > 0) {
    spdlog::warn(
        "jobs: drain deadline: aborting {} send(s) in progress; their jobs go back to "
        "the queue",
        runner_->stats().running);
  }
  runner_->abort_attempts();
}

}  // namespace squall::squalld

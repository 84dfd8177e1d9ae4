#include "server/webhooks.hpp"

#include <algorithm>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <utility>
#include <vector>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <spdlog/spdlog.h>

namespace squall::squalld {

namespace {

// Deliveries at once; more owed webhooks wait for the next claim.
constexpr std::size_t kMaxInFlight = 16;
constexpr std::chrono::milliseconds kPollInterval{500};
// A claim's lease beyond the attempt's timeout: a dispatcher that dies mid-delivery leaves
// the webhook due again after it.
constexpr std::chrono::milliseconds kLeaseMargin{5'000};

std::int64_t unix_now_seconds() {
  return jobs::unix_now_ms() / 1000;
}

}  // namespace

std::string webhook_signature(std::string_view secret, std::int64_t unix_seconds,
                              std::string_view body) {
  const std::string t = std::to_string(unix_seconds);
  std::string signed_text;
  signed_text.reserve(t.size() + 1 + body.size());
  signed_text.append(t).append(".").append(body);
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  if (HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
           reinterpret_cast<const unsigned char*>(signed_text.data()), signed_text.size(), mac,
           &size) == nullptr) {
    throw std::runtime_error("webhooks: HMAC-SHA256 of a body failed");
  }
  static constexpr char digits[] = "0123456789abcdef";
  std::string value = "t=" + t + ",v1=";
  for (unsigned int i = 0; i < size; ++i) {
    value += digits[mac[i] >> 4];
    value += digits[mac[i] & 0x0f];
  }
  return value;
}

std::chrono::milliseconds webhook_backoff(int attempt, double unit) {
  constexpr std::int64_t kFirstMs = 1'000;
  constexpr std::int64_t kMaxMs = 3'600'000;
  std::int64_t wait = kFirstMs;
  for (int i = 1; i < attempt && wait < kMaxMs; ++i) wait *= 2;
  wait = std::min(wait, kMaxMs);
  unit = std::clamp(unit, 0.0, 1.0);
  return std::chrono::milliseconds(wait / 2 + static_cast<std::int64_t>(unit * (wait / 2)));
}

WebhookDispatcher::WebhookDispatcher(Loop& loop, jobs::StoreWorker& store, WebhookSettings settings,
                                     BodyOf body_of, metrics::Registry& registry)
    : loop_(loop),
      store_(store),
      settings_(std::move(settings)),
      body_of_(std::move(body_of)),
      client_(std::make_unique<http::Client>(loop)),
      alive_(std::make_shared<bool>(true)) {
  delivered_ = &registry
                    .counter("squall_webhooks_delivered_total",
                             "Job webhooks delivered (the receiver answered 2xx).")
                    .get();
  failed_ = &registry
                 .counter("squall_webhooks_failed_total",
                          "Job webhooks given up after [webhooks] max_attempts.")
                 .get();
  attempts_ =
      &registry.counter("squall_webhooks_attempts_total", "Job webhook delivery attempts started.")
           .get();
  pending_ =
      &registry
           .gauge("squall_webhooks_pending", "Job webhooks owed (not yet delivered or given up).")
           .get();
}

WebhookDispatcher::~WebhookDispatcher() {
  *alive_ = false;
  if (poll_timer_ != 0) loop_.cancel(poll_timer_);
  if (client_) client_->close();
}

void WebhookDispatcher::start() {
  if (poll_timer_ != 0 || draining_) return;
  poll_timer_ = loop_.call_every(kPollInterval, [this] { claim(); });
  claim();
}

void WebhookDispatcher::poke() {
  if (!draining_) claim();
}

void WebhookDispatcher::drain() {
  draining_ = true;
  if (poll_timer_ != 0) loop_.cancel(poll_timer_);
  poll_timer_ = 0;
  if (client_) {
    if (!in_flight_.empty()) {
      spdlog::info("webhooks: stopping: {} delivery(ies) in flight cancelled; they stay owed",
                   in_flight_.size());
    }
    client_->close();  // Each cancelled callback records its webhook as due again.
  }
}

void WebhookDispatcher::claim() {
  if (claim_in_flight_ || draining_ || in_flight_.size() >= kMaxInFlight) return;
  claim_in_flight_ = true;
  const std::size_t room = kMaxInFlight - in_flight_.size();
  const std::int64_t lease_ms = (settings_.timeout + kLeaseMargin).count();
  std::weak_ptr<bool> alive = alive_;
  const bool queued =
      store_.run([this, alive, room, lease_ms, &loop = loop_](jobs::JobStore& store) {
        std::vector<jobs::Job> claimed;
        std::int64_t owed = -1;
        std::string error;
        try {
          claimed = store.claim_webhooks(room, jobs::unix_now_ms(), lease_ms);
          owed = store.count_webhooks_owed();
        } catch (const std::exception& failure) {
          error = failure.what();
        }
        loop.call_soon([this, alive, claimed = std::move(claimed), owed, error] {
          const auto still = alive.lock();
          if (!still || !*still) return;
          claim_in_flight_ = false;
          if (!error.empty()) {
            spdlog::error("webhooks: claiming owed webhooks failed: {}", error);
            return;
          }
          if (owed >= 0) pending_->set(static_cast<double>(owed));
          for (const jobs::Job& job : claimed) deliver(job);
        });
      });
  if (!queued) claim_in_flight_ = false;
}

void WebhookDispatcher::deliver(const jobs::Job& job) {
  if (draining_ || !client_ || in_flight_.contains(job.id)) return;
  const std::string type = job.state == jobs::JobState::sent ? "job.sent" : "job.failed";
  const std::string event_id = "evt_" + job.id + "_" + type.substr(4);
  http::FetchRequest request;
  request.method = "POST";
  request.url = settings_.url;  // The configured URL, never one from a request.
  request.body = body_of_(job, event_id, type);
  request.headers = {
      {"Content-Type", "application/json"},
      {"Squall-Signature", webhook_signature(settings_.secret, unix_now_seconds(), request.body)},
      {"Squall-Event-Id", event_id},
      {"Squall-Event-Type", type},
  };
  request.connect_timeout = settings_.timeout;
  request.total_timeout = settings_.timeout;
  request.max_body_size = 64 * 1024;  // The receiver's answer is only logged.
  in_flight_.insert(job.id);
  attempts_->inc();
  const int attempt = job.webhook_attempts;
  std::weak_ptr<bool> alive = alive_;
  client_->fetch(std::move(request), [this, alive, id = job.id, event_id,
                                      attempt](http::FetchResult result) {
    const auto still = alive.lock();
    if (!still || !*still) return;
    in_flight_.erase(id);
    std::string problem;
    if (result.ok()) {
      const int status = result.response().status;
      if (status >= 200 && status < 300) {
        delivered_->inc();
        spdlog::debug("webhooks: event {} delivered (HTTP {})", event_id, status);
        record(id, jobs::WebhookState::delivered, 0);
        return;
      }
      problem = "the receiver answered HTTP " + std::to_string(status);
    } else if (result.error().kind() == http::FetchError::Kind::cancelled) {
      // Stopping: owed again at once (for the next start), the attempt not counted.
      record(id, jobs::WebhookState::none, 0);
      return;
    } else {
      problem = result.error().what();
    }
    if (attempt >= settings_.max_attempts) {
      failed_->inc();
      spdlog::warn("webhooks: event {} given up after {} attempt(s) ([webhooks] max_attempts): {}",
                   event_id, attempt, problem);
      record(id, jobs::WebhookState::given_up, 0);
      return;
    }
    static thread_local std::mt19937_64 random{std::random_device{}()};
    const double unit = std::uniform_real_distribution<double>(0.0, 1.0)(random);
    const auto wait = webhook_backoff(attempt, unit);
    spdlog::info("webhooks: event {} attempt {} failed: {}; next in {} ms", event_id, attempt,
                 problem, wait.count());
    record(id, jobs::WebhookState::owed, jobs::unix_now_ms() + wait.count());
  });
}

void WebhookDispatcher::record(const std::string& id, jobs::WebhookState state,
                               std::int64_t due_ms) {
  std::weak_ptr<bool> alive = alive_;
  const bool queued = store_.run([alive, id, state, due_ms, &loop = loop_](jobs::JobStore& store) {
    std::string error;
    try {
      // none: a cancelled delivery, released (see JobStore::release_webhook).
      if (state == jobs::WebhookState::none) {
        store.release_webhook(id, jobs::unix_now_ms());
      } else {
        store.mark_webhook(id, state, due_ms, jobs::unix_now_ms());
      }
    } catch (const std::exception& failure) {
      error = failure.what();
    }
    if (error.empty()) return;
    loop.call_soon([alive, id, error] {
      const auto still = alive.lock();
      if (!still || !*still) return;
      // The claim's lease ends anyway: the webhook is due again then.
      spdlog::error("webhooks: recording the webhook of job {} failed: {}", id, error);
    });
  });
  if (!queued) {
    spdlog::warn(
        "webhooks: the job store is closed: the webhook of job {} stays owed until "
        "its claim's lease ends",
        id);
  }
}

}  // namespace squall::squalld

#include "squall/mail/smtp.hpp"

#include <curl/curl.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <thread>
#include <utility>

namespace squall::mail {
namespace {

// What the debug callback saw of the SMTP dialogue: the last complete reply and the command it
// answered. Only command verbs are kept, never their arguments after AUTH: the SASL exchange
// carries the credentials.
struct Transcript {
  std::string pending_line;  // a reply line not yet ended by LF
  std::string reply_lines;   // the lines of a multi-line reply read so far
  long reply_code = 0;       // the last complete reply (QUIT's excluded)
  std::string reply_text;
  std::string stage = "greeting";  // what the next reply answers
  bool quitting = false;
  bool message_started = false;  // some of the message (after DATA's 354) went out

  // Ready for the next transaction, the strings' capacity kept.
  void clear() {
    pending_line.clear();
    reply_lines.clear();
    reply_code = 0;
    reply_text.clear();
    stage = "greeting";
    quitting = false;
    message_started = false;
  }

  void on_reply_line(std::string_view line) {
    if (quitting || line.size() < 3) return;
    for (int i = 0; i < 3; ++i) {
      if (line[i] < '0' || line[i] > '9') return;
    }
    const std::string_view text = line.size() > 4 ? line.substr(4) : std::string_view();
    if (!reply_lines.empty()) reply_lines += ' ';
    reply_lines += text;
    if (line.size() > 3 && line[3] == '-') return;  // more lines follow
    reply_code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
    reply_text = std::move(reply_lines);
    reply_lines.clear();
  }

  void on_command(std::string_view line) {
    while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.remove_suffix(1);
    auto starts = [&line](std::string_view verb) {
      if (line.size() < verb.size()) return false;
      for (std::size_t i = 0; i < verb.size(); ++i) {
        const char c = line[i];
        if ((c >= 'a' && c <= 'z' ? char(c - 'a' + 'A') : c) != verb[i]) return false;
      }
      return true;
    };
    if (starts("RCPT TO:")) {
      // The address says which recipient the server refused.
      const auto close = line.find('>');
      stage = std::string(line.substr(0, close == line.npos ? line.size() : close + 1));
    } else if (starts("AUTH ")) {
      const auto end = line.find(' ', 5);
      stage = std::string(line.substr(0, end == line.npos ? line.size() : end));
    } else if (starts("MAIL FROM:")) {
      stage = "MAIL FROM";
    } else if (starts("QUIT")) {
      quitting = true;
    } else {
      for (std::string_view verb : {"EHLO", "HELO", "STARTTLS", "DATA"}) {
        if (starts(verb) && (line.size() == verb.size() || line[verb.size()] == ' ')) {
          stage = std::string(verb);
        }
      }
      // Anything else is a SASL response (credentials): ignored.
    }
  }
};

int on_debug(CURL*, curl_infotype type, char* data, std::size_t size, void* user) {
  auto& transcript = *static_cast<Transcript*>(user);
  const std::string_view bytes(data, size);
  if (type == CURLINFO_HEADER_IN) {
    transcript.pending_line += bytes;
    std::size_t lf;
    while ((lf = transcript.pending_line.find('\n')) != std::string::npos) {
      std::string_view line(transcript.pending_line.data(), lf);
      if (line.ends_with('\r')) line.remove_suffix(1);
      transcript.on_reply_line(line);
      transcript.pending_line.erase(0, lf + 1);
    }
  } else if (type == CURLINFO_HEADER_OUT) {
    transcript.on_command(bytes);
  } else if (type == CURLINFO_DATA_OUT) {
    transcript.stage = "end of DATA";  // the next reply is the verdict on the message
    transcript.message_started = true;
  }
  return 0;
}

struct Upload {
  std::string_view data;
  std::size_t offset = 0;
};

// What an easy handle's options point at, made with the handle and freed after it (its
// CURLOPT_PRIVATE), so that the options are set once per connection rather than once per
// message, and stay valid while the closing thread's QUIT runs the debug callback. A handle is
// used by one thread at a time: the send it is lent to, or the closing thread.
struct HandleState {
  Upload upload;                                    // the message of the send in progress
  Transcript transcript;                            // the dialogue of that send
  std::shared_ptr<const std::atomic<bool>> cancel;  // that send's cancel flag (may be empty)
  char error_buffer[CURL_ERROR_SIZE] = "";          // CURLOPT_ERRORBUFFER
};

HandleState& state_of(CURL* h) {
  char* state = nullptr;
  curl_easy_getinfo(h, CURLINFO_PRIVATE, &state);
  return *reinterpret_cast<HandleState*>(state);
}

// libcurl calls it at least once a second during a transfer, also while it waits for a reply.
int on_progress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  const auto& cancel = static_cast<const HandleState*>(user)->cancel;
  return cancel != nullptr && cancel->load(std::memory_order_relaxed) ? 1 : 0;
}

std::size_t on_read(char* buffer, std::size_t size, std::size_t count, void* user) {
  auto& upload = *static_cast<Upload*>(user);
  const std::size_t n = std::min(size * count, upload.data.size() - upload.offset);
  std::memcpy(buffer, upload.data.data() + upload.offset, n);
  upload.offset += n;
  return n;
}

// Control characters and non-ASCII become '?', and the length is capped: the text comes from
// the server and ends up in logs and JSON.
std::string printable(std::string_view text, std::size_t max = 300) {
  std::string out;
  for (const char c : text.substr(0, max)) {
    out += (c >= 0x20 && c < 0x7f) ? c : '?';
  }
  if (text.size() > max) out += "...";
  return out;
}

std::string strip_userinfo(std::string_view url) {
  const auto scheme = url.find("://");
  if (scheme == std::string_view::npos) return std::string(url);
  const auto authority = scheme + 3;
  const auto end = url.find_first_of("/?#", authority);
  const auto at = url.substr(0, end).rfind('@');
  if (at == std::string_view::npos || at < authority) return std::string(url);
  return std::string(url.substr(0, authority)) + std::string(url.substr(at + 1));
}

// strerror is not thread-safe; this runs on pool threads. (GNU strerror_r returns the text.)
std::string error_text(long error) {
  char buffer[128];
  return printable(strerror_r(static_cast<int>(error), buffer, sizeof buffer));
}

bool has_cr_lf_nul(std::string_view s) {
  return s.find_first_of(std::string_view("\r\n\0", 3)) != std::string_view::npos;
}

// A new easy handle for the relay, its options set for every message it will send: only the
// envelope and the message change between them. nullptr when out of memory.
CURL* open_handle(const SmtpSettings& settings) {
  auto* state = new (std::nothrow) HandleState;
  if (state == nullptr) return nullptr;
  CURL* h = curl_easy_init();
  if (h == nullptr) {
    delete state;
    return nullptr;
  }
  curl_easy_setopt(h, CURLOPT_PRIVATE, state);
  const long use_ssl = settings.starttls == SmtpSettings::StartTls::off ? CURLUSESSL_NONE
                       : settings.starttls == SmtpSettings::StartTls::opportunistic
                           ? CURLUSESSL_TRY
                           : CURLUSESSL_ALL;
  curl_easy_setopt(h, CURLOPT_URL, settings.url.c_str());
  // Only SMTP: a mistyped http:// URL must not make libcurl speak another protocol.
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
  // Pool threads must not get SIGALRM from libcurl's timeouts (it uses the threaded resolver).
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
  curl_easy_setopt(h, CURLOPT_READFUNCTION, on_read);
  curl_easy_setopt(h, CURLOPT_READDATA, &state->upload);
  // 0 (the default, spelled out): one refused recipient fails the send before DATA, so no
  // recipient gets the mail twice when the job is retried.
  curl_easy_setopt(h, CURLOPT_MAIL_RCPT_ALLLOWFAILS, 0L);
  curl_easy_setopt(h, CURLOPT_USE_SSL, use_ssl);
  // Every TLS connection verifies the certificate and host name (libcurl's default, spelled
  // out), against ca_file or the system's CA store: a relay that cannot prove who it is gets no
  // message and no password. Skipping it takes an explicit setting (tls_verify = false),
  // which squalld logs loudly. The options of a handle never change, so its kept connection
  // always has the TLS settings, user and password it was opened with.
  curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, settings.tls_verify ? 1L : 0L);
  curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, settings.tls_verify ? 2L : 0L);
  if (!settings.ca_file.empty()) curl_easy_setopt(h, CURLOPT_CAINFO, settings.ca_file.c_str());
  curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
  curl_easy_setopt(h, CURLOPT_XFERINFODATA, state);
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS,
                   static_cast<long>(settings.connect_timeout.count()));
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, static_cast<long>(settings.timeout.count()));
  // libcurl waits for the reply to QUIT (sent when the connection is closed) without the overall
  // timeout, for the per-reply timeout instead (120 s by default): bound it by ours. It never
  // cuts the dialogue itself short, which CURLOPT_TIMEOUT_MS already bounds.
  const auto timeout_seconds = (settings.timeout.count() + 999) / 1000;
  curl_easy_setopt(h, CURLOPT_SERVER_RESPONSE_TIMEOUT,
                   static_cast<long>(std::max<long long>(1, timeout_seconds)));
  // libcurl reuses no connection idle for longer than this (118 s by default, closing it without
  // QUIT): the pool's own idle_timeout, which QUITs, must come first.
  const auto idle_seconds = (settings.idle_timeout.count() + 999) / 1000;
  curl_easy_setopt(h, CURLOPT_MAXAGE_CONN, static_cast<long>(idle_seconds + 1));
  if (!settings.username.empty()) {
    curl_easy_setopt(h, CURLOPT_USERNAME, settings.username.c_str());
    curl_easy_setopt(h, CURLOPT_PASSWORD, settings.password.c_str());
  }
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, state->error_buffer);
  // VERBOSE only routes the dialogue to on_debug (nothing is printed): it is how the reply text
  // and the command it answered are learnt.
  curl_easy_setopt(h, CURLOPT_VERBOSE, 1L);
  curl_easy_setopt(h, CURLOPT_DEBUGFUNCTION, on_debug);
  curl_easy_setopt(h, CURLOPT_DEBUGDATA, &state->transcript);
  return h;
}

// Closes the handle's connection (QUIT, unless its socket was shut down) and frees it.
void close_handle(CURL* h) {
  if (h == nullptr) return;
  HandleState* state = &state_of(h);
  curl_easy_cleanup(h);
  delete state;
}

struct SlistDeleter {
  void operator()(curl_slist* list) const { curl_slist_free_all(list); }
};

SendResult temporary(std::string detail, long code = 0) {
  return {SendOutcome::temporary_failure, code, std::move(detail)};
}
SendResult permanent(std::string detail, long code = 0) {
  return {SendOutcome::permanent_failure, code, std::move(detail)};
}

// Turns libcurl's verdict into sent / retry later / give up. libcurl 7.88 reports a refusal by
// the server as CURLE_SEND_ERROR (MAIL, RCPT, DATA), CURLE_RECV_ERROR (the reply after the
// message), CURLE_WEIRD_SERVER_REPLY (greeting), CURLE_REMOTE_ACCESS_DENIED (EHLO/HELO),
// CURLE_LOGIN_DENIED (AUTH) or CURLE_USE_SSL_FAILED (STARTTLS); CURLINFO_RESPONSE_CODE holds the
// last reply's code (QUIT's excluded), which decides those cases.
SendResult classify(CURLcode rc, long code, const Transcript& transcript, long os_errno,
                    const char* error_buffer, const std::string& url) {
  const std::string curl_text = printable(*error_buffer ? error_buffer : curl_easy_strerror(rc));
  const bool server_refused = rc == CURLE_SEND_ERROR || rc == CURLE_RECV_ERROR ||
                              rc == CURLE_WEIRD_SERVER_REPLY || rc == CURLE_REMOTE_ACCESS_DENIED ||
                              rc == CURLE_LOGIN_DENIED || rc == CURLE_USE_SSL_FAILED ||
                              rc == CURLE_AUTH_ERROR;
  if (server_refused && code >= 400 && code <= 599) {
    std::string text = transcript.reply_code == code ? printable(transcript.reply_text) : "";
    std::string detail = "SMTP " + std::to_string(code) + (text.empty() ? "" : " " + text) + " (" +
                         transcript.stage + ")";
    // 4xx is the server's "try again later" (RFC 5321 4.2.1), also for AUTH (454 4.7.0).
    if (code < 500) return temporary(std::move(detail), code);
    // A 5xx greeting (or reply to EHLO/HELO) refuses the connection, not this message (an
    // overloaded or blocking server); like Postfix, retry later instead of bouncing the mail.
    if (transcript.stage == "greeting" || transcript.stage == "EHLO" ||
        transcript.stage == "HELO") {
      return temporary(std::move(detail), code);
    }
    // 5xx to MAIL, RCPT, DATA or the message is final: retrying sends the same thing again.
    // 535 to AUTH means wrong credentials, which only an operator can fix.
    return permanent(std::move(detail), code);
  }
  switch (rc) {
    case CURLE_COULDNT_CONNECT:
      // Nothing listening is usually a relay being restarted: retry.
      if (os_errno == ECONNREFUSED) return temporary("connection refused: " + url);
      return temporary("could not connect (" + (os_errno ? error_text(os_errno) : curl_text) +
                       "): " + url);
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
      // DNS failures are often transient; a wrong host name fails every attempt until the
      // job runs out of them.
      return temporary("could not resolve the host: " + url);
    case CURLE_OPERATION_TIMEDOUT:
      // The server may have accepted a message whose reply never came: the retry can
      // duplicate it, which the stable Message-ID lets receivers detect.
      return temporary("timed out (" + transcript.stage + "): " + url);
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_WEIRD_SERVER_REPLY:
    case CURLE_PARTIAL_FILE:
    case CURLE_AGAIN:
      return temporary("connection failed (" + transcript.stage + "): " + curl_text + ": " + url);
    case CURLE_USE_SSL_FAILED:
      // starttls = "required" but the server offers no STARTTLS (or refused it without a 4xx):
      // a misconfiguration; sending in clear text is exactly what "required" forbids.
      return permanent("STARTTLS is required but the server does not offer it: " + url);
    case CURLE_LOGIN_DENIED:
    case CURLE_AUTH_ERROR:
      // Wrong credentials or no common mechanism: only an operator can fix that.
      return permanent("login denied (" + curl_text + "): " + url);
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_ENGINE_NOTFOUND:
      // The server's certificate does not verify, or the local TLS setup is broken: a
      // misconfiguration (or an attack), not something a retry fixes.
      return permanent("TLS setup failed (" + curl_text + "): " + url);
    case CURLE_URL_MALFORMAT:
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_NOT_BUILT_IN:
    case CURLE_BAD_FUNCTION_ARGUMENT:
      return permanent("unusable SMTP settings (" + curl_text + "): " + url);
    default:
      // Anything else (TLS handshake failures, out of memory, ...) gets another attempt; the
      // job's max_attempts bounds the retries.
      return temporary(curl_text + ": " + url);
  }
}

}  // namespace

std::string_view to_string(SendOutcome outcome) {
  switch (outcome) {
    case SendOutcome::sent:
      return "sent";
    case SendOutcome::temporary_failure:
      return "temporary_failure";
    case SendOutcome::permanent_failure:
      return "permanent_failure";
    case SendOutcome::aborted:
      return "aborted";
  }
  return "unknown";
}

void global_init() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
      throw std::runtime_error("curl_global_init failed");
    }
  });
}

namespace detail {

// The easy handles of one mailer, each keeping (at most) one connection to the relay in its
// cache. A handle is either lent to one send or idle here; a background thread closes those idle
// for longer than idle_timeout. Thread-safe.
class SmtpConnectionPool {
 public:
  // `settings` (the mailer's) outlive the pool.
  explicit SmtpConnectionPool(const SmtpSettings& settings)
      : settings_(settings),
        max_connections_(std::max<std::size_t>(1, settings.connections)),
        idle_timeout_(settings.idle_timeout) {}

  ~SmtpConnectionPool() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    changed_.notify_all();
    if (closer_.joinable()) {
      closer_.join();
    } else {
      for (const Idle& idle : idle_) close_handle(idle.handle);
    }
  }
  SmtpConnectionPool(const SmtpConnectionPool&) = delete;
  SmtpConnectionPool& operator=(const SmtpConnectionPool&) = delete;

  // An idle handle (the one used last: the others age out), a new one while fewer than
  // max_connections exist, or else the next one given back. nullptr when `cancel` turned true
  // first (*cancelled is then true) or libcurl is out of memory.
  CURL* acquire(const std::atomic<bool>* cancel, bool* cancelled) {
    *cancelled = false;
    std::unique_lock lock(mutex_);
    for (;;) {
      if (!idle_.empty()) {
        CURL* handle = idle_.back().handle;
        idle_.pop_back();
        return handle;
      }
      if (open_ < max_connections_) break;
      if (cancel != nullptr && cancel->load(std::memory_order_relaxed)) {
        *cancelled = true;
        return nullptr;
      }
      // The cancel flag has no way to wake us: look at it every 100 ms.
      changed_.wait_for(lock, std::chrono::milliseconds(100));
    }
    ++open_;
    lock.unlock();
    CURL* handle = open_handle(settings_);
    if (handle == nullptr) give_back(nullptr, false);
    return handle;
  }

  // A handle whose connection is fresh: the old one is closed without QUIT (it failed).
  CURL* replace(CURL* handle) {
    close_failed(handle);
    return open_handle(settings_);
  }

  // Ends a send: `reusable` keeps the handle and its connection for the next send; otherwise
  // the connection (which failed) is cut without waiting for anything more from the relay.
  void give_back(CURL* handle, bool reusable, curl_socket_t socket = CURL_SOCKET_BAD) {
    if (handle != nullptr && reusable) {
      {
        std::lock_guard lock(mutex_);
        idle_.push_back({handle, socket, std::chrono::steady_clock::now()});
        if (!closer_.joinable()) closer_ = std::thread([this] { close_idle(); });
      }
      changed_.notify_all();
      return;
    }
    close_failed(handle);
    {
      std::lock_guard lock(mutex_);
      --open_;
    }
    changed_.notify_all();
  }

  void count_connects(long connects) {
    opened_.fetch_add(static_cast<std::uint64_t>(std::max(0L, connects)),
                      std::memory_order_relaxed);
  }
  std::uint64_t opened() const noexcept { return opened_.load(std::memory_order_relaxed); }

 private:
  struct Idle {
    CURL* handle;
    curl_socket_t socket;                         // its connection's, untouched while idle
    std::chrono::steady_clock::time_point since;  // when its last send ended
  };

  // perform() has shut the failed connection's socket down: the QUIT libcurl may still send
  // fails at once.
  static void close_failed(CURL* handle) { close_handle(handle); }

  // The closing thread: QUITs each connection idle for idle_timeout (the oldest are at the front),
  // and every idle one when the pool is destroyed. curl_easy_cleanup waits for the QUIT's reply,
  // so it runs without the lock. When the pool is destroyed (a reload, the end of the process)
  // nobody waits for that reply: the read side is shut down first, so a relay that never answers
  // QUIT holds up neither.
  void close_idle() {
    std::unique_lock lock(mutex_);
    for (;;) {
      std::vector<Idle> expired;
      const auto now = std::chrono::steady_clock::now();
      while (!idle_.empty() && (stopping_ || now - idle_.front().since >= idle_timeout_)) {
        expired.push_back(idle_.front());
        idle_.erase(idle_.begin());
      }
      if (!expired.empty()) {
        open_ -= expired.size();
        const bool stopping = stopping_;
        lock.unlock();
        changed_.notify_all();
        for (const Idle& idle : expired) {
          if (stopping && idle.socket != CURL_SOCKET_BAD) ::shutdown(idle.socket, SHUT_RD);
          close_handle(idle.handle);
        }
        lock.lock();
        continue;
      }
      if (stopping_) return;
      if (idle_.empty()) {
        changed_.wait(lock);
      } else {
        changed_.wait_until(lock, idle_.front().since + idle_timeout_);
      }
    }
  }

  const SmtpSettings& settings_;  // what open_handle sets each new handle up with
  const std::size_t max_connections_;
  const std::chrono::milliseconds idle_timeout_;
  std::mutex mutex_;
  std::condition_variable changed_;  // a handle came back, or the pool is stopping
  std::vector<Idle> idle_;           // oldest first
  std::size_t open_ = 0;             // handles lent out or idle
  bool stopping_ = false;
  std::thread closer_;  // started with the first idle connection
  std::atomic<std::uint64_t> opened_{0};
};

}  // namespace detail

SmtpMailer::SmtpMailer(SmtpSettings settings)
    : settings_(std::move(settings)),
      display_url_(strip_userinfo(settings_.url)),
      implicit_tls_(settings_.url.size() >= 8 &&
                    curl_strnequal(settings_.url.c_str(), "smtps://", 8) != 0),
      pool_(std::make_unique<detail::SmtpConnectionPool>(settings_)) {}

SmtpMailer::~SmtpMailer() = default;

std::uint64_t SmtpMailer::connections_opened() const noexcept {
  return pool_->opened();
}

namespace {

// One transaction over `h`, on its cached connection if it has one. The transcript and the
// error text stay in the handle's state until the handle goes back to the pool.
struct Transfer {
  CURLcode rc = CURLE_OK;
  long code = 0;
  long os_errno = 0;
  bool new_connection = false;             // libcurl connected anew rather than reusing
  curl_socket_t socket = CURL_SOCKET_BAD;  // the connection's, after a success
  const HandleState* state = nullptr;      // the transcript and CURLOPT_ERRORBUFFER's text
};

Transfer perform(CURL* h, const std::string& from, curl_slist* rcpt, std::string_view mime,
                 const std::shared_ptr<const std::atomic<bool>>& cancel) {
  HandleState& state = state_of(h);
  state.upload = Upload{mime, 0};
  state.transcript.clear();
  if (state.cancel != cancel) state.cancel = cancel;
  state.error_buffer[0] = '\0';
  curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(mime.size()));
  curl_easy_setopt(h, CURLOPT_MAIL_FROM, from.c_str());
  curl_easy_setopt(h, CURLOPT_MAIL_RCPT, rcpt);

  Transfer transfer;
  transfer.state = &state;
  transfer.rc = curl_easy_perform(h);
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &transfer.code);
  curl_easy_getinfo(h, CURLINFO_OS_ERRNO, &transfer.os_errno);
  long connects = 0;
  curl_easy_getinfo(h, CURLINFO_NUM_CONNECTS, &connects);
  transfer.new_connection = connects > 0;
  // The recipient list is the caller's: the handle must not keep pointing at it.
  curl_easy_setopt(h, CURLOPT_MAIL_RCPT, nullptr);
  if (transfer.rc == CURLE_OK) {
    curl_easy_getinfo(h, CURLINFO_ACTIVESOCKET, &transfer.socket);
  } else {
    // After a timeout libcurl keeps the connection and sends QUIT when it closes it, then waits
    // for a reply a stuck server never gives. Nothing more is owed to a server that failed us:
    // shutting the socket down makes that QUIT fail at once.
    curl_socket_t socket = CURL_SOCKET_BAD;
    if (curl_easy_getinfo(h, CURLINFO_ACTIVESOCKET, &socket) == CURLE_OK &&
        socket != CURL_SOCKET_BAD) {
      ::shutdown(socket, SHUT_RDWR);
    }
  }
  return transfer;
}

// A kept connection that failed before any of the message went out, by a cut connection or a
// 421 ("closing the channel"): the relay closed it while it sat idle. The message cannot have
// been taken, so it goes out over a new connection at once.
bool stale_connection(const Transfer& transfer) {
  if (transfer.new_connection || transfer.state->transcript.message_started) return false;
  switch (transfer.rc) {
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_WEIRD_SERVER_REPLY:
      return transfer.code == 0 || transfer.code == 421;
    default:
      return false;
  }
}

}  // namespace

SendResult SmtpMailer::send(std::string_view envelope_from,
                            const std::vector<std::string>& recipients, std::string_view mime,
                            std::shared_ptr<const std::atomic<bool>> cancel) const {
  global_init();
  if (recipients.empty()) return permanent("no recipients");
  // libcurl writes these into SMTP commands as they are: a line break would add a command.
  if (has_cr_lf_nul(envelope_from)) return permanent("the envelope sender has CR, LF or NUL");
  std::unique_ptr<curl_slist, SlistDeleter> rcpt;
  for (const auto& recipient : recipients) {
    if (has_cr_lf_nul(recipient)) return permanent("a recipient has CR, LF or NUL");
    curl_slist* appended = curl_slist_append(rcpt.get(), ("<" + recipient + ">").c_str());
    if (appended == nullptr) return temporary("out of memory");
    rcpt.release();
    rcpt.reset(appended);
  }
  const std::string from = "<" + std::string(envelope_from) + ">";

  bool cancelled = false;
  CURL* h = pool_->acquire(cancel.get(), &cancelled);
  if (cancelled)
    return {SendOutcome::aborted, 0, "aborted (waiting for a connection): " + display_url_};
  if (h == nullptr) return temporary("curl_easy_init failed");
  Transfer transfer = perform(h, from, rcpt.get(), mime, cancel);
  pool_->count_connects(transfer.new_connection ? 1 : 0);
  if (transfer.rc != CURLE_OK && stale_connection(transfer)) {
    h = pool_->replace(h);
    if (h == nullptr) {
      pool_->give_back(nullptr, false);
      return temporary("curl_easy_init failed");
    }
    transfer = perform(h, from, rcpt.get(), mime, cancel);
    pool_->count_connects(transfer.new_connection ? 1 : 0);
  }

  // Read before the handle goes back: then another send or the closing thread may use it.
  const Transcript& transcript = transfer.state->transcript;
  const long code = transfer.code;
  SendResult result;
  if (transfer.rc == CURLE_ABORTED_BY_CALLBACK) {
    result = {SendOutcome::aborted, 0, "aborted (" + transcript.stage + "): " + display_url_};
  } else if (transfer.rc == CURLE_OK) {
    std::string text = transcript.reply_code == code ? printable(transcript.reply_text) : "";
    result = {SendOutcome::sent, code,
              "SMTP " + std::to_string(code) + (text.empty() ? "" : " " + text)};
  } else {
    result = classify(transfer.rc, code, transcript, transfer.os_errno,
                      transfer.state->error_buffer, display_url_);
  }
  // Only a connection whose transaction succeeded is kept: after any failure libcurl has closed
  // it (and sent QUIT) or it is cut here, so no transaction is ever left half done on it.
  pool_->give_back(h, transfer.rc == CURLE_OK, transfer.socket);
  // Belt and braces: no server or libcurl text may echo the password into a job's last_error.
  if (!settings_.password.empty()) {
    for (auto at = result.detail.find(settings_.password); at != std::string::npos;
         at = result.detail.find(settings_.password, at)) {
      result.detail.replace(at, settings_.password.size(), "***");
    }
  }
  return result;
}

}  // namespace squall::mail

#include "squall/mail/smtp.hpp"

#include "mail/smtp_dialogue.hpp"

#include <curl/curl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <stdexcept>
#include <thread>
#include <utility>

namespace squall::mail {
namespace {

// What the debug callback saw of the dialogue libcurl holds while it connects (greeting, EHLO,
// STARTTLS, AUTH): the last complete reply, the command it answered, and whether the reply to the
// last EHLO offered PIPELINING. Only command verbs are kept, never their arguments after AUTH: the
// SASL exchange carries the credentials.
struct Transcript {
  std::string pending_line;  // a reply line not yet ended by LF
  std::string reply_lines;   // the lines of a multi-line reply read so far
  long reply_code = 0;       // the last complete reply (QUIT's excluded)
  std::string reply_text;
  std::string stage = "greeting";  // what the next reply answers
  bool quitting = false;
  // The reply to the last EHLO names PIPELINING, SIZE (after STARTTLS the client says EHLO
  // again and only that second reply counts).
  bool pipelining = false;
  bool size = false;

  // Ready for a new connection, the strings' capacity kept.
  void clear() {
    pending_line.clear();
    reply_lines.clear();
    reply_code = 0;
    reply_text.clear();
    stage = "greeting";
    quitting = false;
    pipelining = false;
    size = false;
  }

  void on_reply_line(std::string_view line) {
    if (quitting || line.size() < 3) return;
    for (int i = 0; i < 3; ++i) {
      if (line[i] < '0' || line[i] > '9') return;
    }
    const std::string_view text = line.size() > 4 ? line.substr(4) : std::string_view();
    if (stage == "EHLO" && line[0] == '2') {
      pipelining = pipelining || detail::names_extension(text, "PIPELINING");
      size = size || detail::names_extension(text, "SIZE");
    }
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
    if (starts("AUTH ")) {
      const auto end = line.find(' ', 5);
      stage = std::string(line.substr(0, end == line.npos ? line.size() : end));
    } else if (starts("QUIT")) {
      quitting = true;
    } else {
      for (std::string_view verb : {"EHLO", "HELO", "STARTTLS"}) {
        if (starts(verb) && (line.size() == verb.size() || line[verb.size()] == ' ')) {
          stage = std::string(verb);
          if (verb != "STARTTLS") pipelining = size = false;  // a new greeting, new capabilities
        }
      }
      // Anything else is a SASL response (credentials): ignored.
    }
  }
};

int on_debug(CURL*, curl_infotype type, char* data, std::size_t size, void* user) {
  auto& transcript = *static_cast<Transcript*>(user);
  const std::string_view bytes(data, size);
  try {
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
    }
  } catch (const std::bad_alloc&) {
    // No exception crosses libcurl; the transcript only words the error texts.
  }
  return 0;
}

// What an easy handle's options point at, and its connection's state, made with the handle and
// freed after it (its CURLOPT_PRIVATE). A handle is used by one thread at a time: the send it is
// lent to, or the closing thread.
struct HandleState {
  Transcript transcript;                            // the dialogue while libcurl connects
  std::shared_ptr<const std::atomic<bool>> cancel;  // the connecting send's cancel flag
  char error_buffer[CURL_ERROR_SIZE] = "";          // CURLOPT_ERRORBUFFER
  bool connected = false;  // libcurl's connect phase succeeded: the transactions are ours
  curl_socket_t socket = CURL_SOCKET_BAD;  // the connection's, once connected
  std::string outgoing;                    // commands or the dot-stuffed message being written
};

HandleState& state_of(CURL* h) {
  char* state = nullptr;
  curl_easy_getinfo(h, CURLINFO_PRIVATE, &state);
  return *reinterpret_cast<HandleState*>(state);
}

// libcurl calls it at least once a second while it connects, also while it waits for a reply.
int on_progress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  const auto& cancel = static_cast<const HandleState*>(user)->cancel;
  return cancel != nullptr && cancel->load(std::memory_order_relaxed) ? 1 : 0;
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

// A new easy handle for the relay. Its curl_easy_perform only connects (CONNECT_ONLY): TCP, the
// greeting, EHLO, STARTTLS or implicit TLS, AUTH, all of SMTP's connect phase, and stops; the mail
// transactions then go over that connection through curl_easy_send and curl_easy_recv (see
// run_transaction). nullptr when out of memory.
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
  curl_easy_setopt(h, CURLOPT_CONNECT_ONLY, 1L);
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
  // CURLOPT_TIMEOUT_MS is set before each connect: what is left of the send's timeout.
  // libcurl waits for the reply to a QUIT it sends (when its connect phase fails after the
  // greeting) without the overall timeout, for the per-reply timeout instead (120 s by default):
  // bound it by ours.
  const auto timeout_seconds = (settings.timeout.count() + 999) / 1000;
  curl_easy_setopt(h, CURLOPT_SERVER_RESPONSE_TIMEOUT,
                   static_cast<long>(std::max<long long>(1, timeout_seconds)));
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

using Clock = std::chrono::steady_clock;

// Raw bytes over a connected handle's connection (through TLS when it is on), within `deadline`,
// giving up once `cancel` (if any) turns true: it is looked at every quarter of a second while
// waiting.
class Wire {
 public:
  enum class Status { ok, closed, failed, timed_out, aborted };

  Wire(CURL* handle, curl_socket_t socket, Clock::time_point deadline,
       const std::atomic<bool>* cancel)
      : handle_(handle), socket_(socket), deadline_(deadline), cancel_(cancel) {}

  Status write(std::string_view bytes) {
    while (!bytes.empty()) {
      std::size_t sent = 0;
      const CURLcode rc = curl_easy_send(handle_, bytes.data(), bytes.size(), &sent);
      if (rc == CURLE_OK && sent > 0) {
        bytes.remove_prefix(sent);
      } else if (rc == CURLE_OK || rc == CURLE_AGAIN) {
        // After CURLE_AGAIN the same bytes are offered again (OpenSSL wants that).
        if (const Status status = wait(POLLOUT); status != Status::ok) return status;
      } else {
        error_ = curl_easy_strerror(rc);
        return Status::failed;
      }
    }
    return Status::ok;
  }

  // The next reply, read as far as needed into `reader` (which may already hold it).
  Status read(detail::SmtpReplyReader& reader, detail::SmtpReply& reply) {
    for (;;) {
      switch (reader.next(reply)) {
        case detail::SmtpReplyReader::Status::reply:
          return Status::ok;
        case detail::SmtpReplyReader::Status::malformed:
          error_ = "a malformed reply";
          return Status::failed;
        case detail::SmtpReplyReader::Status::need_more:
          break;
      }
      // Try to read before polling: TLS may hold decrypted bytes the socket no longer shows.
      char buffer[4096];
      std::size_t received = 0;
      const CURLcode rc = curl_easy_recv(handle_, buffer, sizeof buffer, &received);
      if (rc == CURLE_OK && received > 0) {
        reader.append(std::string_view(buffer, received));
      } else if (rc == CURLE_OK) {
        return Status::closed;
      } else if (rc == CURLE_AGAIN) {
        if (const Status status = wait(POLLIN); status != Status::ok) return status;
      } else {
        error_ = curl_easy_strerror(rc);
        return Status::failed;
      }
    }
  }

  // Why the last write or read failed (Status::failed).
  const char* error() const noexcept { return error_; }

 private:
  Status wait(short events) {
    for (;;) {
      if (cancel_ != nullptr && cancel_->load(std::memory_order_relaxed)) return Status::aborted;
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline_ - Clock::now());
      if (left.count() <= 0) return Status::timed_out;
      pollfd fd{socket_, events, 0};
      const int ready = ::poll(&fd, 1, static_cast<int>(std::min<long long>(left.count(), 250)));
      if (ready > 0) return Status::ok;  // also POLLERR / POLLHUP: the next call tells
      if (ready < 0 && errno != EINTR) {
        error_ = "poll failed";
        return Status::failed;
      }
    }
  }

  CURL* handle_;
  curl_socket_t socket_;
  Clock::time_point deadline_;
  const std::atomic<bool>* cancel_;
  const char* error_ = "";  // static text: libcurl's curl_easy_strerror or ours
};

// How a connection ends when its send is over.
enum class Ending {
  keep,  // it goes back to the pool for the next send
  quit,  // the relay is owed a QUIT, and gets it (its reply awaited until the deadline)
  cut,   // it failed, or the relay waits for a message that must not come: shut down at once
};

// Ends the handle's connection as `ending` says (keep is quit here) and frees the handle. A
// handle whose connect phase failed was closed by libcurl already.
void close_handle(CURL* h, Ending ending, Clock::time_point deadline) {
  if (h == nullptr) return;
  HandleState* state = &state_of(h);
  if (state->connected && state->socket != CURL_SOCKET_BAD) {
    if (ending == Ending::cut) {
      ::shutdown(state->socket, SHUT_RDWR);
    } else {
      // libcurl 7.88 closes a CONNECT_ONLY connection without QUIT: say it ourselves.
      Wire wire(h, state->socket, deadline, nullptr);
      if (wire.write("QUIT\r\n") == Wire::Status::ok) {
        detail::SmtpReplyReader reader;
        detail::SmtpReply reply;
        wire.read(reader, reply);
      }
    }
  }
  curl_easy_cleanup(h);
  delete state;
}

SendResult temporary(std::string detail, long code = 0) {
  return {SendOutcome::temporary_failure, code, std::move(detail)};
}
SendResult permanent(std::string detail, long code = 0) {
  return {SendOutcome::permanent_failure, code, std::move(detail)};
}

// Turns libcurl's verdict on a failed connect phase into retry later / give up. libcurl 7.88
// reports a refusal by the server as CURLE_WEIRD_SERVER_REPLY (greeting),
// CURLE_REMOTE_ACCESS_DENIED (EHLO/HELO), CURLE_LOGIN_DENIED (AUTH) or CURLE_USE_SSL_FAILED
// (STARTTLS), or CURLE_SEND_ERROR / CURLE_RECV_ERROR; CURLINFO_RESPONSE_CODE holds the last
// reply's code (QUIT's excluded), which decides those cases.
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

// The easy handles of one mailer, each with (at most) one connection to the relay. A handle is
// either lent to one send or idle here; a background thread closes those idle for longer than
// idle_timeout. Thread-safe.
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
      for (const Idle& idle : idle_) close_handle(idle.handle, Ending::quit, quit_deadline());
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
    if (handle == nullptr) give_back(nullptr, Ending::cut);
    return handle;
  }

  // A fresh handle in place of `handle`, whose connection is cut (the relay closed it).
  CURL* replace(CURL* handle) {
    close_handle(handle, Ending::cut, Clock::now());
    return open_handle(settings_);
  }

  // Ends a send: keep puts the handle and its connection back for the next send; otherwise the
  // connection is closed as `ending` says (the QUIT's reply awaited until `deadline`).
  void give_back(CURL* handle, Ending ending, Clock::time_point deadline = Clock::now()) {
    if (handle != nullptr && ending == Ending::keep) {
      {
        std::lock_guard lock(mutex_);
        idle_.push_back({handle, Clock::now()});
        if (!closer_.joinable()) closer_ = std::thread([this] { close_idle(); });
      }
      changed_.notify_all();
      return;
    }
    close_handle(handle, ending, deadline);
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
    Clock::time_point since;  // when its last send ended
  };

  // How long a QUIT's reply is awaited when an idle connection is closed.
  Clock::time_point quit_deadline() const { return Clock::now() + settings_.timeout; }

  // The closing thread: QUITs each connection idle for idle_timeout (the oldest are at the front),
  // and every idle one when the pool is destroyed. The QUIT's reply is awaited without the lock.
  // When the pool is destroyed (a reload, the end of the process) nobody waits for that reply:
  // the read side is shut down first, so a relay that never answers QUIT holds up neither.
  void close_idle() {
    pthread_setname_np(pthread_self(), "squall-smtp");  // Seen in top -H, ps -L, perf.
    std::unique_lock lock(mutex_);
    for (;;) {
      std::vector<Idle> expired;
      const auto now = Clock::now();
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
          const curl_socket_t socket = state_of(idle.handle).socket;
          if (stopping && socket != CURL_SOCKET_BAD) ::shutdown(socket, SHUT_RD);
          close_handle(idle.handle, Ending::quit, quit_deadline());
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
      pool_(std::make_unique<detail::SmtpConnectionPool>(settings_)) {}

SmtpMailer::~SmtpMailer() = default;

std::uint64_t SmtpMailer::connections_opened() const noexcept {
  return pool_->opened();
}

namespace {

// libcurl's connect phase on a fresh handle (greeting, EHLO, STARTTLS, AUTH), bounded by what is
// left until `deadline`. Its failure is told by classify().
struct Connect {
  CURLcode rc = CURLE_OK;
  long code = 0;      // the last reply's (CURLINFO_RESPONSE_CODE)
  long os_errno = 0;  // CURLINFO_OS_ERRNO
  long connects = 0;  // CURLINFO_NUM_CONNECTS
};

Connect connect(CURL* h, Clock::time_point deadline,
                const std::shared_ptr<const std::atomic<bool>>& cancel) {
  HandleState& state = state_of(h);
  state.transcript.clear();
  if (state.cancel != cancel) state.cancel = cancel;
  state.error_buffer[0] = '\0';
  const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, static_cast<long>(std::max<long long>(1, left.count())));
  Connect result;
  result.rc = curl_easy_perform(h);
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &result.code);
  curl_easy_getinfo(h, CURLINFO_OS_ERRNO, &result.os_errno);
  curl_easy_getinfo(h, CURLINFO_NUM_CONNECTS, &result.connects);
  curl_socket_t socket = CURL_SOCKET_BAD;
  curl_easy_getinfo(h, CURLINFO_ACTIVESOCKET, &socket);
  if (result.rc == CURLE_OK && socket != CURL_SOCKET_BAD) {
    state.connected = true;
    state.socket = socket;
  } else {
    if (result.rc == CURLE_OK) result.rc = CURLE_COULDNT_CONNECT;  // no socket: cannot happen
    // After a timeout libcurl keeps the connection and sends QUIT when it closes it, then waits
    // for a reply a stuck server never gives. Nothing more is owed to a server that failed us:
    // shutting the socket down makes that QUIT fail at once.
    if (socket != CURL_SOCKET_BAD) ::shutdown(socket, SHUT_RDWR);
  }
  return result;
}

// How one mail transaction ended.
struct Transaction {
  enum class Kind {
    sent,       // 2xx to the end of DATA
    refused,    // a reply other than the one wanted (2xx, or 354 to DATA)
    cut,        // the connection failed: closed, reset, a malformed reply
    timed_out,  // the send's deadline passed
    aborted,    // the cancel flag turned true
  } kind = Kind::sent;
  detail::SmtpReply reply;       // sent, refused: the reply that decided
  std::string stage;             // what that reply, or the failure, answered
  const char* error = "";        // cut: why
  bool message_started = false;  // some of the message went out
  Ending ending = Ending::cut;   // how the connection ends
};

Transaction wire_failure(Wire::Status status, const Wire& wire, std::string stage) {
  Transaction t;
  t.stage = std::move(stage);
  switch (status) {
    case Wire::Status::timed_out:
      t.kind = Transaction::Kind::timed_out;
      break;
    case Wire::Status::aborted:
      t.kind = Transaction::Kind::aborted;
      break;
    case Wire::Status::closed:
      t.kind = Transaction::Kind::cut;
      t.error = "the relay closed the connection";
      break;
    default:
      t.kind = Transaction::Kind::cut;
      t.error = wire.error();
      break;
  }
  return t;
}

// A refusal leaves the connection able to take QUIT, unless the relay is closing it (421).
Transaction refusal(detail::SmtpReply reply, std::string stage) {
  Transaction t;
  t.kind = Transaction::Kind::refused;
  t.ending = reply.code == 421 ? Ending::cut : Ending::quit;
  t.reply = std::move(reply);
  t.stage = std::move(stage);
  return t;
}

// Ask for MAIL FROM, every RCPT TO and DATA, and if each is accepted send the message.
// With PIPELINING (RFC 2920) the commands go out in one write and their replies are read in
// order; without it each command awaits its reply. One refused recipient fails the whole send
// before any of the message goes out: a retry must not give the accepted recipients a second
// copy. If DATA was already answered 354 (pipelined), the relay now waits for the message: it
// gets neither the message nor a lone dot (an empty message) but a cut connection, which makes
// it discard the transaction (RFC 5321 3.3, 4.1.4).
Transaction run_transaction(Wire& wire, detail::SmtpReplyReader& reader, std::string& outgoing,
                            bool pipelining, bool size, const std::string& from,
                            const std::vector<std::string>& recipients, std::string_view mime) {
  const std::size_t commands = recipients.size() + 2;  // MAIL, each RCPT, DATA
  // As libcurl: the size of the message before dot-stuffing, when the relay takes SIZE.
  const std::string mail_from =
      "MAIL FROM:" + from + (size ? " SIZE=" + std::to_string(mime.size()) : std::string());
  auto command = [&](std::size_t i) {
    if (i == 0) {
      outgoing += mail_from;
    } else if (i == commands - 1) {
      outgoing += "DATA";
    } else {
      outgoing.append("RCPT TO:<").append(recipients[i - 1]).append(">");
    }
    outgoing += "\r\n";
  };
  auto stage = [&](std::size_t i) {
    return i == 0              ? std::string("MAIL FROM")
           : i == commands - 1 ? std::string("DATA")
                               : "RCPT TO:<" + recipients[i - 1] + ">";
  };
  std::optional<Transaction> refused;  // the first refusal, while later replies are read
  if (pipelining) {
    outgoing.clear();
    for (std::size_t i = 0; i < commands; ++i) command(i);
    if (const auto status = wire.write(outgoing); status != Wire::Status::ok) {
      return wire_failure(status, wire, stage(0));
    }
  }
  for (std::size_t i = 0; i < commands; ++i) {
    if (!pipelining) {
      outgoing.clear();
      command(i);
      if (const auto status = wire.write(outgoing); status != Wire::Status::ok) {
        return wire_failure(status, wire, stage(i));
      }
    }
    detail::SmtpReply reply;
    if (const auto status = wire.read(reader, reply); status != Wire::Status::ok) {
      if (!refused) return wire_failure(status, wire, stage(i));
      refused->ending = Ending::cut;  // the refusal is the story; the connection is gone
      return *refused;
    }
    const bool data = i == commands - 1;
    const bool accepted = data ? reply.code == 354 : reply.code / 100 == 2;
    if (refused) {
      // A 354 to DATA after a refusal: the relay waits for a message that must not come.
      if (data && accepted) refused->ending = Ending::cut;
      if (data || reply.code == 421) return *refused;
      continue;
    }
    if (!accepted) {
      refused = refusal(std::move(reply), stage(i));
      // Without pipelining nothing more was asked; a 421 means no more replies will come.
      if (!pipelining || data || refused->ending == Ending::cut) return *refused;
    }
  }

  outgoing.clear();
  detail::append_dot_stuffed(outgoing, mime);
  detail::SmtpReply reply;
  Wire::Status status = wire.write(outgoing);
  if (status == Wire::Status::ok) status = wire.read(reader, reply);
  Transaction t;
  if (status != Wire::Status::ok) {
    t = wire_failure(status, wire, "end of DATA");
  } else if (reply.code / 100 != 2) {
    t = refusal(std::move(reply), "end of DATA");
  } else {
    t.reply = std::move(reply);
    t.stage = "end of DATA";
    // Bytes after the reply would make the next transaction read the wrong replies.
    t.ending = reader.empty() ? Ending::keep : Ending::cut;
  }
  t.message_started = true;
  return t;
}

// A kept connection that failed before any of the message went out, by a cut connection or a
// 421 ("closing the channel"): the relay closed it while it sat idle. The message cannot have
// been taken, so it goes out over a new connection at once.
bool stale_connection(const Transaction& t) {
  if (t.message_started) return false;
  return t.kind == Transaction::Kind::cut ||
         (t.kind == Transaction::Kind::refused && t.reply.code == 421);
}

SendResult result_of(const Transaction& t, const std::string& url) {
  switch (t.kind) {
    case Transaction::Kind::sent: {
      const std::string text = printable(t.reply.text);
      return {SendOutcome::sent, t.reply.code,
              "SMTP " + std::to_string(t.reply.code) + (text.empty() ? "" : " " + text)};
    }
    case Transaction::Kind::refused: {
      const std::string text = printable(t.reply.text);
      std::string detail = "SMTP " + std::to_string(t.reply.code) +
                           (text.empty() ? "" : " " + text) + " (" + t.stage + ")";
      // 4xx is the server's "try again later" (RFC 5321 4.2.1); 5xx to MAIL, RCPT, DATA or the
      // message is final: retrying sends the same thing again. Anything else is not SMTP as
      // the relay should speak it: another attempt, bounded by the job's max_attempts.
      if (t.reply.code >= 500 && t.reply.code <= 599) {
        return permanent(std::move(detail), t.reply.code);
      }
      return temporary(std::move(detail), t.reply.code);
    }
    case Transaction::Kind::cut:
      return temporary("connection failed (" + t.stage + "): " + printable(t.error) + ": " + url);
    case Transaction::Kind::timed_out:
      // The server may have accepted a message whose reply never came: the retry can
      // duplicate it, which the stable Message-ID lets receivers detect.
      return temporary("timed out (" + t.stage + "): " + url);
    case Transaction::Kind::aborted:
      return {SendOutcome::aborted, 0, "aborted (" + t.stage + "): " + url};
  }
  return temporary("unknown outcome: " + url);
}

}  // namespace

SendResult SmtpMailer::send(std::string_view envelope_from,
                            const std::vector<std::string>& recipients, std::string_view mime,
                            std::shared_ptr<const std::atomic<bool>> cancel) const {
  global_init();
  if (recipients.empty()) return permanent("no recipients");
  // These go into SMTP commands as they are: a line break would add a command.
  if (has_cr_lf_nul(envelope_from)) return permanent("the envelope sender has CR, LF or NUL");
  for (const auto& recipient : recipients) {
    if (has_cr_lf_nul(recipient)) return permanent("a recipient has CR, LF or NUL");
  }
  const std::string from = "<" + std::string(envelope_from) + ">";

  bool cancelled = false;
  CURL* h = pool_->acquire(cancel.get(), &cancelled);
  if (cancelled)
    return {SendOutcome::aborted, 0, "aborted (waiting for a connection): " + display_url_};
  if (h == nullptr) return temporary("curl_easy_init failed");

  SendResult result;
  for (bool retried = false;; retried = true) {
    // settings.timeout bounds each attempt, its connect included.
    const auto deadline = Clock::now() + settings_.timeout;
    HandleState& state = state_of(h);
    const bool kept = state.connected;
    if (!kept) {
      const Connect connected = connect(h, deadline, cancel);
      pool_->count_connects(connected.connects);
      if (connected.rc != CURLE_OK) {
        result = connected.rc == CURLE_ABORTED_BY_CALLBACK
                     ? SendResult{SendOutcome::aborted, 0,
                                  "aborted (" + state.transcript.stage + "): " + display_url_}
                     : classify(connected.rc, connected.code, state.transcript, connected.os_errno,
                                state.error_buffer, display_url_);
        pool_->give_back(h, Ending::cut);
        break;
      }
    }
    Wire wire(h, state.socket, deadline, cancel.get());
    detail::SmtpReplyReader reader;
    const Transaction t = run_transaction(wire, reader, state.outgoing, state.transcript.pipelining,
                                          state.transcript.size, from, recipients, mime);
    if (kept && !retried && stale_connection(t)) {
      h = pool_->replace(h);
      if (h == nullptr) {
        pool_->give_back(nullptr, Ending::cut);
        return temporary("curl_easy_init failed");
      }
      continue;
    }
    result = result_of(t, display_url_);
    // Only a connection whose transaction succeeded is kept: after a refusal it gets QUIT, after
    // any other failure it is cut, so no transaction is ever left half done on it.
    pool_->give_back(h, t.ending, deadline);
    break;
  }
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

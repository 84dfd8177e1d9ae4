// The blocking SMTP send, run on libuv's thread pool. An SmtpMailer keeps up to
// SmtpSettings::connections connections to its relay open and sends one message after another
// over each: libcurl opens a connection (greeting, EHLO, STARTTLS, AUTH), then the mailer runs
// each mail transaction over it itself, with MAIL FROM, the RCPTs and DATA in one write when the
// relay offers PIPELINING (RFC 2920). SmtpMailer::send is safe to call from several pool threads
// at once: each send has a connection to itself.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace squall::mail {

struct SmtpSettings {
  // smtp://host:port (STARTTLS per starttls) or smtps://host:port (TLS from the start). A path
  // names the EHLO domain (smtp://relay:587/client.example.com); without one libcurl sends the
  // machine's host name. In squalld's config also "maildir:PATH" (see maildir.hpp).
  std::string url = "smtp://127.0.0.1:25";
  // For smtp:// URLs. off: never STARTTLS. opportunistic: STARTTLS when offered, in clear text
  // otherwise. required: STARTTLS or no send (a permanent failure). Whenever TLS is used (also
  // smtps://) the certificate is verified unless tls_verify is false.
  enum class StartTls { off, opportunistic, required } starttls = StartTls::opportunistic;
  std::string username;  // "" = no AUTH
  std::string password;  // never logged nor put in a SendResult
  std::chrono::milliseconds connect_timeout{10000};
  std::chrono::milliseconds timeout{60000};  // the whole exchange, connect included
  // Whether TLS verifies the relay's certificate and host name: false leaves the connection
  // open to anyone on the path (and the password with it).
  bool tls_verify = true;
  // PEM file of the CA certificates that verify the relay ("" = the system's CA store).
  std::string ca_file;
  // Connections to the relay open at most at once; a send finds one free, or waits for one.
  std::size_t connections = 2;
  // A connection nobody has sent over for this long is closed (QUIT) by a background thread.
  std::chrono::milliseconds idle_timeout{30000};
  bool operator==(const SmtpSettings&) const = default;
};

// aborted: the caller's cancel flag stopped the transfer (shutdown); nothing is known of the
// message (the relay may have taken it just before the cut).
enum class SendOutcome { sent, temporary_failure, permanent_failure, aborted };

// "sent", "temporary_failure", "permanent_failure", "aborted".
std::string_view to_string(SendOutcome outcome);

struct SendResult {
  SendOutcome outcome;
  // The server's reply code that decided the outcome (250 when sent), 0 when no reply did
  // (connection refused, timeout, TLS or configuration errors).
  long smtp_code;
  // One line for the job's last_error, e.g. "SMTP 451 4.3.0 try later (RCPT TO:<a@b.c>)" or
  // "connection refused: smtp://127.0.0.1:2525". Printable ASCII; never has the password.
  std::string detail;
};

// curl_global_init, once. Call it at start-up before any thread starts (libcurl 7.88's global
// init is not thread-safe); send() also calls it, harmlessly, for tools and tests.
void global_init();

namespace detail {
class SmtpConnectionPool;
}

class SmtpMailer {
 public:
  explicit SmtpMailer(SmtpSettings settings);
  // Closes the idle connections (QUIT, waiting for the reply up to settings.timeout). No send
  // may be running.
  ~SmtpMailer();
  SmtpMailer(const SmtpMailer&) = delete;
  SmtpMailer& operator=(const SmtpMailer&) = delete;

  // Sends mime (CRLF lines, not dot-stuffed: send does that) to every recipient, over an
  // open connection to the relay when one is free, else over a new one (up to
  // settings.connections; beyond that it waits for a connection to come free). Blocks for up to
  // settings.timeout once it has its connection. A recipient the server refuses fails the whole
  // send before DATA, so a retry never duplicates the mail for the recipients that were
  // accepted. A connection that fails is closed, never used again. A kept connection that turns
  // out to be closed by the relay before any of the message went out (the relay's own idle
  // timeout, a 421) is replaced by a new one and the message sent over that, once. Once
  // `cancel` (if given) turns true, the transfer (or the wait for a connection) stops within
  // about a second: SendOutcome::aborted.
  SendResult send(std::string_view envelope_from, const std::vector<std::string>& recipients,
                  std::string_view mime,
                  std::shared_ptr<const std::atomic<bool>> cancel = nullptr) const;
  // The relay's URL without any user:password@, for logs.
  const std::string& display_url() const noexcept { return display_url_; }
  const SmtpSettings& settings() const noexcept { return settings_; }
  // Connections opened so far (new ones, not reuses), for tests and metrics.
  std::uint64_t connections_opened() const noexcept;

 private:
  SmtpSettings settings_;
  std::string display_url_;  // the URL without any user:password@
  // The open connections (libcurl easy handles); its mutex makes send() thread-safe.
  std::unique_ptr<detail::SmtpConnectionPool> pool_;
};

}  // namespace squall::mail

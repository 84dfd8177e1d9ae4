// Sends per second through squall::mail::SmtpMailer to one relay, with kept connections (one
// mailer, messages one after another over each connection) or with a fresh connection per
// message (a new mailer each time: connect, greeting, EHLO, the message, QUIT; what squalld did
// before [smtp] connections). Run by bench/smtp_send_rate.sh.
//
//   smtp_send_rate URL MESSAGES THREADS kept|fresh
//
// THREADS threads send MESSAGES messages in all (THREADS connections when kept). Prints one line:
// "<mode> <messages sent> <seconds> <sends per second> <CPU microseconds per send>"; exit status
// 1 if any send failed.
#include <sys/resource.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include <squall/mail/email.hpp>
#include <squall/mail/smtp.hpp>

using namespace squall::mail;

namespace {

double cpu_seconds() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         static_cast<double>(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: smtp_send_rate URL MESSAGES THREADS kept|fresh\n");
    return 64;
  }
  const std::string url = argv[1];
  const long messages = std::atol(argv[2]);
  const long threads = std::atol(argv[3]);
  const std::string mode = argv[4];
  if (messages < 1 || threads < 1 || (mode != "kept" && mode != "fresh")) {
    std::fprintf(stderr, "smtp_send_rate: MESSAGES and THREADS above 0, mode kept or fresh\n");
    return 64;
  }
  global_init();
  Email email;
  email.to = {"rcpt@example.com"};
  email.subject = "bench";
  email.text = "A message of a few lines, as a notification would be.\n";
  const std::string from = "Squall Bench <bench@example.com>";
  const std::string mime =
      build_mime(email, from, make_message_id("bench", from), std::chrono::system_clock::now());
  const std::string sender = envelope_sender(email, from);
  const std::vector<std::string> recipients = envelope_recipients(email);

  SmtpSettings settings;
  settings.url = url;
  settings.starttls = SmtpSettings::StartTls::off;
  settings.connections = static_cast<std::size_t>(threads);
  SmtpMailer kept(settings);
  std::atomic<long> next{0};
  std::atomic<long> sent{0};
  std::atomic<bool> failed{false};
  const double cpu_before = cpu_seconds();
  const auto started = std::chrono::steady_clock::now();
  std::vector<std::thread> workers;
  for (long t = 0; t < threads; ++t) {
    workers.emplace_back([&] {
      while (next.fetch_add(1) < messages) {
        SendResult result;
        if (mode == "kept") {
          result = kept.send(sender, recipients, mime);
        } else {
          SmtpSettings one = settings;
          one.connections = 1;
          const SmtpMailer fresh(one);
          result = fresh.send(sender, recipients, mime);
        }
        if (result.outcome == SendOutcome::sent) {
          ++sent;
        } else if (!failed.exchange(true)) {
          std::fprintf(stderr, "smtp_send_rate: %s\n", result.detail.c_str());
        }
      }
    });
  }
  for (std::thread& worker : workers) worker.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  const double cpu = cpu_seconds() - cpu_before;
  std::printf("%s %ld %.3f %.0f %.1f\n", mode.c_str(), sent.load(), seconds,
              static_cast<double>(sent.load()) / seconds,
              sent.load() > 0 ? cpu / static_cast<double>(sent.load()) * 1e6 : 0.0);
  return failed ? 1 : 0;
}

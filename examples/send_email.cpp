// Sends one email the way squalld's job runner does: reads a POST /email body from stdin,
// validates it, builds the MIME message and sends it through SMTP. For operators checking a
// relay and for tests. Build with `make examples`, then for example:
//   echo '{"to": "a@example.com", "subject": "hi", "text": "hello"}' |
//     build/examples/send_email --url smtp://127.0.0.1:25 --from 'Squall <squall@example.com>'
// Prints one JSON line: {"outcome": "sent" | "temporary_failure" | "permanent_failure",
// "smtp_code": 250, "detail": "...", "message_id": "..."}, or {"error": {"field", "message"}} for
// a rejected request. Exit status: 0 sent, 1 temporary failure, 2 permanent failure, 3 rejected
// request, 64 usage. --repeat N sends the message N times through one mailer (over its kept
// connections, at most --connections of them) and adds "sends" (each outcome) and
// "connections_opened" to the line; the other fields are the last send's. The password comes from
// the SMTP_PASSWORD environment variable, never from the command line (which other users can read
// in ps).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <random>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include <squall/mail/email.hpp>
#include <squall/mail/smtp.hpp>

using namespace squall::mail;

namespace {

constexpr std::string_view kUsage =
    "usage: send_email --url smtp://host:port [--from ADDRESS] [--starttls "
    "off|opportunistic|required]\n"
    "                  [--username NAME] [--timeout MS] [--connect-timeout MS] [--job-id ID]\n"
    "                  [--max-recipients N] [--max-bytes N] [--ca-file PEM] [--no-verify]\n"
    "                  [--repeat N] [--connections N] [--print-mime] < email.json\n"
    "The password is read from $SMTP_PASSWORD.\n";

[[noreturn]] void usage(std::string_view problem) {
  std::cerr << "send_email: " << problem << "\n" << kUsage;
  std::exit(64);
}

long to_number(std::string_view option, const std::string& value) {
  char* end = nullptr;
  const long n = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || n < 0) usage(std::string(option) + " needs a number");
  return n;
}

std::string random_job_id() {
  std::random_device random;
  char buf[32];
  std::snprintf(buf, sizeof buf, "send-email-%08x%08x", static_cast<unsigned>(random()),
                static_cast<unsigned>(random()));
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  global_init();
  SmtpSettings settings;
  std::string default_from = "squall@localhost";
  std::string job_id;
  EmailLimits limits;
  bool print_mime = false;
  long repeat = 0;  // 0: send once, without the extra fields
  for (int i = 1; i < argc; ++i) {
    const std::string_view option = argv[i];
    if (option == "--print-mime") {
      print_mime = true;
      continue;
    }
    if (option == "--no-verify") {
      settings.tls_verify = false;
      continue;
    }
    if (option == "--help" || option == "-h") {
      std::cout << kUsage;
      return 0;
    }
    if (i + 1 >= argc) usage(std::string(option) + " needs a value");
    const std::string value = argv[++i];
    if (option == "--url") {
      settings.url = value;
    } else if (option == "--from") {
      default_from = value;
    } else if (option == "--starttls") {
      if (value == "off") {
        settings.starttls = SmtpSettings::StartTls::off;
      } else if (value == "opportunistic") {
        settings.starttls = SmtpSettings::StartTls::opportunistic;
      } else if (value == "required") {
        settings.starttls = SmtpSettings::StartTls::required;
      } else {
        usage("--starttls is off, opportunistic or required");
      }
    } else if (option == "--username") {
      settings.username = value;
    } else if (option == "--timeout") {
      settings.timeout = std::chrono::milliseconds(to_number(option, value));
    } else if (option == "--connect-timeout") {
      settings.connect_timeout = std::chrono::milliseconds(to_number(option, value));
    } else if (option == "--ca-file") {
      settings.ca_file = value;
    } else if (option == "--repeat") {
      repeat = to_number(option, value);
      if (repeat < 1) usage("--repeat needs a number above 0");
    } else if (option == "--connections") {
      settings.connections = static_cast<std::size_t>(to_number(option, value));
      if (settings.connections < 1) usage("--connections needs a number above 0");
    } else if (option == "--job-id") {
      job_id = value;
    } else if (option == "--max-recipients") {
      limits.max_recipients = static_cast<std::size_t>(to_number(option, value));
    } else if (option == "--max-bytes") {
      limits.max_email_bytes = static_cast<std::size_t>(to_number(option, value));
    } else {
      usage("unknown option " + std::string(option));
    }
  }
  if (settings.url.empty() && !print_mime) usage("--url is required");
  if (const char* password = std::getenv("SMTP_PASSWORD")) settings.password = password;
  if (auto parsed = parse_address(default_from); std::holds_alternative<std::string>(parsed)) {
    usage("--from is not a valid address: " + std::get<std::string>(parsed));
  }

  const std::string body{std::istreambuf_iterator<char>(std::cin),
                         std::istreambuf_iterator<char>()};
  auto request = parse_email_request(body, limits);
  if (auto* error = std::get_if<FieldError>(&request)) {
    std::cout
        << nlohmann::json{{"error", {{"field", error->field}, {"message", error->message}}}}.dump()
        << "\n";
    return 3;
  }
  const Email& email = std::get<Email>(request);
  const std::string message_id =
      make_message_id(job_id.empty() ? random_job_id() : job_id, default_from);
  const std::string mime =
      build_mime(email, default_from, message_id, std::chrono::system_clock::now());
  if (print_mime) {
    std::cout << mime;
    return 0;
  }

  const SmtpMailer mailer(settings);
  SendResult result;
  nlohmann::json sends = nlohmann::json::array();
  for (long i = 0; i < std::max(1L, repeat); ++i) {
    result = mailer.send(envelope_sender(email, default_from), envelope_recipients(email), mime);
    sends.push_back(to_string(result.outcome));
  }
  nlohmann::json line{{"outcome", to_string(result.outcome)},
                      {"smtp_code", result.smtp_code},
                      {"detail", result.detail},
                      {"message_id", message_id}};
  if (repeat > 0) {
    line["sends"] = sends;
    line["connections_opened"] = mailer.connections_opened();
  }
  std::cout << line.dump() << "\n";
  switch (result.outcome) {
    case SendOutcome::sent:
      return 0;
    case SendOutcome::temporary_failure:
      return 1;
    case SendOutcome::permanent_failure:
    case SendOutcome::aborted:
      return 2;
  }
  return 2;
}

// libFuzzer target: a POST /email body through parse_email_request, and every accepted request
// through its stored JSON form and build_mime. Checks: no exception other than the documented
// ones, the stored form round-trips, and the MIME message has CRLF line ends only, every line at
// most 998 bytes (RFC 5322 2.1.1), body lines at most 76 (quoted-printable), and a header
// section whose every line is a header squall writes or a non-blank folded continuation: no
// header line comes from CR or LF in the input.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "squall/mail/email.hpp"

namespace {

using namespace squall::mail;

void check(bool condition) {
  if (!condition) std::abort();
}

constexpr std::string_view kHeaderNames[] = {
    "From:", "To:",         "Cc:",           "Reply-To:",     "Subject:",
    "Date:", "Message-ID:", "MIME-Version:", "Content-Type:", "Content-Transfer-Encoding:"};

bool known_header_line(std::string_view line) {
  if (!line.empty() && (line.front() == ' ' || line.front() == '\t')) {
    // A folded line carries more than whitespace.
    return line.find_first_not_of(" \t") != std::string_view::npos;
  }
  for (const std::string_view name : kHeaderNames) {
    if (line.starts_with(name)) return true;
  }
  return false;
}

void check_mime(std::string_view mime) {
  bool in_headers = true;
  std::size_t start = 0;
  while (start < mime.size()) {
    const std::size_t lf = mime.find('\n', start);
    check(lf != std::string_view::npos);  // The message ends with CRLF.
    check(lf > start && mime[lf - 1] == '\r');
    const std::string_view line = mime.substr(start, lf - 1 - start);
    check(line.find('\r') == std::string_view::npos);  // No bare CR.
    check(line.size() <= 998);
    if (in_headers) {
      if (line.empty()) {
        in_headers = false;
      } else {
        check(known_header_line(line));
      }
    } else {
      // The body is quoted-printable parts and their boundaries: 76 at most (RFC 2045 6.7).
      check(line.size() <= 76);
    }
    start = lf + 1;
  }
  check(!in_headers);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  EmailLimits limits;
  limits.max_recipients = 20;
  limits.max_email_bytes = 64 * 1024;
  const auto parsed = parse_email_request(body, limits);
  const auto* email = std::get_if<Email>(&parsed);
  if (email == nullptr) {
    check(!std::get<FieldError>(parsed).field.empty());
    return 0;
  }
  check(email_from_json(email_to_json(*email)) == *email);
  const auto date = std::chrono::system_clock::time_point(std::chrono::seconds(1'700'000'000));
  check_mime(build_mime(*email, "Squall <squall@example.com>", "0123abcd@example.com", date));
  envelope_recipients(*email);
  envelope_sender(*email, "squall@example.com");
  return 0;
}

// libFuzzer target: a POST /email body through parse_email_request, and every accepted request
// through its stored JSON form, build_mime and prepare_message. Checks: EmailRequestParser's
// one-pass scan gives the DOM path's answer (the same refusal, or the same request, accepted by the
// scan alone, with the stored form email_to_json writes), no exception other than the documented
// ones, the stored form round-trips, prepare_message gives build_mime's message and the envelope
// functions' answers, and the MIME message has CRLF line ends only, every line at most 998 bytes
// (RFC 5322 2.1.1), body lines at most 76 (quoted-printable), and a header section whose every line
// is a header squall writes or a non-blank folded continuation: no header line comes from CR or LF
// in the input.
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "mail/email_dom.hpp"
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
  static EmailRequestParser parser;  // Reused, as the server reuses its own.
  const auto refusal = parser.parse(body, limits);
  const auto parsed = detail::parse_email_request_dom(body, limits);
  const auto* email = std::get_if<Email>(&parsed);
  if (email == nullptr) {
    const FieldError& error = std::get<FieldError>(parsed);
    check(!error.field.empty());
    check(refusal && refusal->field == error.field && refusal->message == error.message);
    check(!parser.scanned());
    return 0;
  }
  check(!refusal && parser.scanned());
  const EmailRequestView& view = parser.request();
  check(view.from == email->from && view.reply_to == email->reply_to &&
        view.subject == email->subject && view.text == email->text && view.html == email->html);
  check(std::equal(view.to.begin(), view.to.end(), email->to.begin(), email->to.end()) &&
        std::equal(view.cc.begin(), view.cc.end(), email->cc.begin(), email->cc.end()) &&
        std::equal(view.bcc.begin(), view.bcc.end(), email->bcc.begin(), email->bcc.end()));
  check(parser.payload() == email_to_json(*email));
  // The stored form earlier versions wrote, which stored jobs and their digests carry.
  const nlohmann::ordered_json stored = {{"from", email->from},
                                         {"to", email->to},
                                         {"cc", email->cc},
                                         {"bcc", email->bcc},
                                         {"reply_to", email->reply_to},
                                         {"subject", email->subject},
                                         {"text", email->text},
                                         {"html", email->html}};
  check(parser.payload() == stored.dump());
  check(email_from_json(parser.payload()) == *email);
  const auto date = std::chrono::system_clock::time_point(std::chrono::seconds(1'700'000'000));
  const std::string mime =
      build_mime(*email, "Squall <squall@example.com>", "0123abcd@example.com", date);
  check_mime(mime);
  const std::vector<std::string> recipients = envelope_recipients(*email);
  const std::string sender = envelope_sender(*email, "Squall <squall@example.com>");
  // prepare_message: the same envelope and message (which differ only in the multipart
  // boundary, random but of one length).
  const OutgoingMessage message =
      prepare_message(*email, "Squall <squall@example.com>", "0123abcd@example.com", date);
  check(message.sender == sender && message.recipients == recipients);
  check(message.mime.size() == mime.size());
  check(message.mime == mime || (!email->text.empty() && !email->html.empty()));
  return 0;
}

// An email job's content: the POST /email request body (parsed and validated), its stored JSON
// form, the MIME message built from it and the SMTP envelope. Everything here is pure and
// thread-safe; build_mime runs on a pool thread right before the send.
#pragma once

#include <chrono>
#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace squall::mail {

// One email as requested. Addresses keep the spelling the client sent ("a@b.c" or
// "Name <a@b.c>"); build_mime re-encodes display names. from and reply_to may be empty: the
// default sender comes from the configuration ([smtp] from).
struct Email {
  std::string from;
  std::vector<std::string> to, cc, bcc;
  std::string reply_to;
  std::string subject;
  std::string text;
  std::string html;
  bool operator==(const Email&) const = default;
};

struct EmailLimits {
  std::size_t max_recipients = 50;        // to + cc + bcc, duplicates counted
  std::size_t max_email_bytes = 1 << 20;  // subject + text + html, in bytes
  bool operator==(const EmailLimits&) const = default;
};

// A rejected request: the JSON field ("to[2]", "subject", or "body" for the document itself)
// and what is wrong with it ("is not a valid address: the domain has an empty label").
struct FieldError {
  std::string field;
  std::string message;
};

// One mailbox: "local@domain" or "Name <local@domain>". addr_spec is the bare address used in
// the SMTP envelope; display_name is unquoted (quoted-pairs resolved) and may be UTF-8.
struct Address {
  std::string display_name;
  std::string addr_spec;
};

// Parses one address of the practical subset of RFC 5322 squall accepts: a local part that is
// a dot-atom or a quoted string (ASCII only, at most 64 octets), a domain of LDH labels or an IP
// literal in brackets ("[192.0.2.1]", "[IPv6:2001:db8::1]"), at most 254 octets in all, no
// whitespace outside the display name, no control characters anywhere. On failure returns a
// short reason ("has no @", "the domain label 'a_b' has a character other than a letter, digit
// or hyphen").
std::variant<Address, std::string> parse_address(std::string_view text);

// The bare address (local@domain) of an address parse_address accepted, as a view into it:
// "a@b.c" for "a@b.c" and for "Name <a@b.c>". Nothing is checked or copied.
std::string_view bare_address(std::string_view valid_address) noexcept;

// Parses and validates a POST /email body: {"to": "a@b.c" | ["a@b.c", ...], "cc": ..., "bcc": ...,
// "from": "...", "reply_to": "...", "subject": "...", "text": "...", "html": "..."}. to and subject
// are required (subject may be ""), and at least one of text and html must be non-empty; null
// counts as absent for the optional fields. Unknown and duplicate keys are errors.
std::variant<Email, FieldError> parse_email_request(std::string_view json_body,
                                                    const EmailLimits& limits);

// A valid POST /email request as views, so that nothing is copied: into the request body, or
// into the EmailRequestParser that produced it (strings written with JSON escapes, decoded).
// Valid while the body lives, until that parser's next parse(). Absent and null fields are "".
struct EmailRequestView {
  std::string_view from, reply_to, subject, text, html;
  std::span<const std::string_view> to, cc, bcc;
};

// parse_email_request and email_to_json in one pass over the body, for a server that accepts
// many: the body is scanned once, its strings are checked where they lie (a string is decoded
// only if it has escapes), and the stored form is written from them. A body the scan refuses is
// handed to parse_email_request's DOM path, which says what is wrong exactly as
// parse_email_request does. Keep one per thread: its buffers keep their capacity, so a stream of
// valid requests allocates nothing but each payload. Not thread-safe.
class EmailRequestParser {
 public:
  // nullopt when json_body is a valid request: then request() and payload() hold it. Otherwise
  // the refusal parse_email_request gives for the same body and limits.
  std::optional<FieldError> parse(std::string_view json_body, const EmailLimits& limits);
  // The request of the last successful parse().
  const EmailRequestView& request() const noexcept { return request_; }
  // Its stored form: email_to_json of the same request, byte for byte. Move it out to keep it.
  std::string& payload() noexcept { return payload_; }
  // Whether the last parse() was decided by the one-pass scan alone (every valid request is);
  // false when the DOM path answered. For tests.
  bool scanned() const noexcept { return scanned_; }

 private:
  bool scan(std::string_view json_body, const EmailLimits& limits);

  std::string decoded_;                       // Strings that had escapes, decoded.
  std::vector<std::string_view> recipients_;  // Every address of to, cc and bcc.
  Email fallback_;                            // What request_ shows when the DOM path accepted.
  EmailRequestView request_;                  // See request().
  std::string payload_;                       // See payload().
  bool scanned_ = false;                      // See scanned().
};

// The stored form: a JSON object with every field; email_from_json(email_to_json(e)) == e.
// The bytes are those nlohmann::ordered_json::dump() writes for the same object, as earlier
// versions stored it (keys in the order from, to, cc, bcc, reply_to, subject, text, html; no
// spaces; only the quote, the backslash and control characters escaped), so that stored jobs
// read back alike and a repeated request digests alike whichever version stored it.
// email_to_json throws std::invalid_argument when a string is not UTF-8. email_from_json throws
// std::invalid_argument on malformed input or unknown keys (missing keys take their empty
// defaults).
std::string email_to_json(const Email& email);
Email email_from_json(std::string_view json);

// The message as sent in SMTP DATA: CRLF line endings, 7-bit only (RFC 2047 encoded-words in
// headers, quoted-printable bodies), no Bcc header. message_id is the id without angle brackets
// (as make_message_id returns it). The bytes are NOT dot-stuffed: libcurl's SMTP upload does
// that. Throws std::invalid_argument when an address does not parse (a stored email is valid;
// default_from comes from the configuration, which should be checked with parse_address at
// start-up) or message_id has control characters.
std::string build_mime(const Email& email, std::string_view default_from,
                       std::string_view message_id, std::chrono::system_clock::time_point date);

// One message ready for SMTP: its envelope and its DATA.
struct OutgoingMessage {
  std::string sender;                   // MAIL FROM: what envelope_sender returns.
  std::vector<std::string> recipients;  // RCPT TO: what envelope_recipients returns.
  std::string mime;                     // DATA: what build_mime returns.
};

// build_mime, envelope_sender and envelope_recipients of one email together, byte for byte what
// they return, with each address parsed once for the headers and the envelope: what a send
// needs. Throws std::invalid_argument as build_mime does, then as envelope_recipients does for
// a Bcc address (which only the envelope holds).
OutgoingMessage prepare_message(const Email& email, std::string_view default_from,
                                std::string_view message_id,
                                std::chrono::system_clock::time_point date);

// A Message-ID that stays the same for every attempt of one job, so that receivers can drop
// duplicates of an at-least-once delivery: "<job_id>@<domain>" without angle brackets. domain
// may be a domain or the default sender's address ("Squall <squall@example.com>"), whose domain
// is taken. Characters of job_id outside RFC 5322 atext become "=XX". Throws
// std::invalid_argument for an empty job id or an unusable domain.
std::string make_message_id(std::string_view job_id, std::string_view domain);

// The envelope: bare addresses of to + cc + bcc in that order, duplicates (same local part, domain
// compared case-insensitively) removed. Throws std::invalid_argument on an unparsable address.
std::vector<std::string> envelope_recipients(const Email& email);

// MAIL FROM: the bare address of email.from, or of default_from when from is empty, so bounces
// go where the From header points. Throws std::invalid_argument on an unparsable address.
std::string envelope_sender(const Email& email, std::string_view default_from);

}  // namespace squall::mail

// The bytes of an SMTP mail transaction that SmtpMailer writes and reads itself, over a
// connection libcurl opened (greeting, EHLO, STARTTLS, AUTH): replies reassembled from whatever
// the reads return, and the message dot-stuffed as libcurl 7.88 does it.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace squall::mail::detail {

struct SmtpReply {
  int code = 0;      // of the reply's last line
  std::string text;  // every line's text after the code, joined by spaces
};

// Splits the bytes the relay sends into replies: one-line ("250 OK") or multi-line ("250-a",
// "250 b") ones, whatever the reads cut them into, several per read included.
class SmtpReplyReader {
 public:
  // At most this many bytes wait for the end of a reply: more is not an SMTP server.
  static constexpr std::size_t max_pending = 64 * 1024;

  enum class Status {
    reply,      // *reply holds the next reply
    need_more,  // no complete reply buffered: read more
    malformed,  // a line without a three-digit code, or max_pending bytes without a reply
  };

  void append(std::string_view bytes) { buffer_.append(bytes); }
  Status next(SmtpReply& reply);
  // Bytes after the last complete reply (none after a transaction with a well-behaved relay).
  bool empty() const noexcept { return buffer_.size() == start_; }

 private:
  std::string buffer_;     // what was read and not yet taken as a reply
  std::size_t start_ = 0;  // where the next line begins in buffer_
};

// Appends `message` to `out` as DATA's content, followed by the end of data: a '.' that starts
// a line (after CRLF, or as the first byte) is doubled, and the message ends with CRLF.CRLF; a
// message that already ends in CRLF (or is empty) gets only ".\r\n". Bare LF and CR are left
// alone. This is libcurl 7.88's escaping (lib/smtp.c, Curl_smtp_escape_eob and smtp_done).
void append_dot_stuffed(std::string& out, std::string_view message);

// Whether a line of the reply to EHLO (its text after "250-" / "250 ") names the extension
// `keyword` ("PIPELINING", "SIZE"), in any case, with or without parameters.
bool names_extension(std::string_view ehlo_line_text, std::string_view keyword);

}  // namespace squall::mail::detail

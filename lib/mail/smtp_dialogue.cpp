#include "mail/smtp_dialogue.hpp"

namespace squall::mail::detail {

SmtpReplyReader::Status SmtpReplyReader::next(SmtpReply& reply) {
  std::string text;
  std::size_t line_start = start_;
  for (;;) {
    const std::size_t lf = buffer_.find('\n', line_start);
    if (lf == std::string::npos) {
      if (buffer_.size() - start_ > max_pending) return Status::malformed;
      // Nothing taken: the next call starts over from start_. Drop the consumed prefix once it
      // outweighs what is left, so the buffer does not grow with the connection's life.
      if (start_ > 0 && start_ >= buffer_.size() - start_) {
        buffer_.erase(0, start_);
        start_ = 0;
      }
      return Status::need_more;
    }
    std::string_view line(buffer_.data() + line_start, lf - line_start);
    if (line.ends_with('\r')) line.remove_suffix(1);
    if (line.size() < 3 || (line.size() > 3 && line[3] != ' ' && line[3] != '-')) {
      return Status::malformed;
    }
    for (int i = 0; i < 3; ++i) {
      if (line[i] < '0' || line[i] > '9') return Status::malformed;
    }
    if (line.size() > 4) {
      if (!text.empty()) text += ' ';
      text += line.substr(4);
    }
    line_start = lf + 1;
    if (line.size() > 3 && line[3] == '-') continue;  // more lines follow
    reply.code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
    reply.text = std::move(text);
    start_ = line_start;
    if (start_ == buffer_.size()) {
      buffer_.clear();
      start_ = 0;
    }
    return Status::reply;
  }
}

void append_dot_stuffed(std::string& out, std::string_view message) {
  out.reserve(out.size() + message.size() + message.size() / 64 + 5);
  std::size_t from = 0;
  if (message.starts_with('.')) {
    out += '.';
  }
  for (std::size_t at; (at = message.find("\r\n.", from)) != std::string_view::npos;) {
    out.append(message.substr(from, at + 3 - from));
    out += '.';
    from = at + 3;
  }
  out.append(message.substr(from));
  out.append(message.empty() || message.ends_with("\r\n") ? ".\r\n" : "\r\n.\r\n");
}

bool names_extension(std::string_view text, std::string_view keyword) {
  if (text.size() < keyword.size()) return false;
  for (std::size_t i = 0; i < keyword.size(); ++i) {
    const char c = text[i];
    if ((c >= 'a' && c <= 'z' ? char(c - 'a' + 'A') : c) != keyword[i]) return false;
  }
  return text.size() == keyword.size() || text[keyword.size()] == ' ';
}

}  // namespace squall::mail::detail

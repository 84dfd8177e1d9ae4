// Mail written to a Maildir instead of an SMTP relay: the development transport (Django's file
// backend, Rails' :file delivery). Each message becomes one file, written in tmp/ and renamed
// into new/, so a reader never sees half a message. Blocking file I/O: run it on the pool.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "squall/mail/smtp.hpp"

namespace squall::mail {

// The URL scheme of [smtp] url that selects this transport: "maildir:PATH".
inline constexpr std::string_view maildir_scheme = "maildir:";

class MaildirWriter {
 public:
  // `directory` is the Maildir itself (the parent of tmp/, new/ and cur/).
  explicit MaildirWriter(std::string directory);

  // Creates the Maildir and its tmp/, new/ and cur/ (mode 0700) where missing. Throws
  // std::runtime_error naming the directory and the system's reason.
  void create_directories() const;

  // Writes `message` (exactly the bytes an SMTP relay would get) to new/<file_name(...)>: first
  // to tmp/, flushed to disk, then renamed, and new/ flushed. One job's message always has the
  // same name: if it is already in new/, or in cur/ (read, with ":2,..." flags), nothing is
  // written again, so an attempt repeated after a crash leaves one file. Every failure is
  // temporary (a full disk, a missing directory): the job is retried.
  SendResult deliver(std::string_view job_id, std::int64_t created_ms,
                     std::string_view message) const;

  // "<created seconds>.<job id>.<host>": unique across jobs, stable across attempts, and sorted
  // by creation like the names other Maildir writers choose.
  std::string file_name(std::string_view job_id, std::int64_t created_ms) const;

  const std::string& directory() const noexcept { return directory_; }

 private:
  std::string directory_;  // The Maildir.
  std::string host_;       // This machine's name, '/' and ':' escaped as the Maildir spec says.
};

// This machine's name for Maildir file names: gethostname with '/' as "\057" and ':' as "\072".
std::string maildir_host_name();

}  // namespace squall::mail

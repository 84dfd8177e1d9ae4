#include "squall/mail/maildir.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <utility>

namespace squall::mail {
namespace {

std::string system_reason(int error) {
  return std::strerror(error);
}

SendResult temporary(std::string detail) {
  return SendResult{SendOutcome::temporary_failure, 0, std::move(detail)};
}

// Closes a descriptor on every path out of deliver().
struct FileDescriptor {
  int fd = -1;
  explicit FileDescriptor(int descriptor) : fd(descriptor) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() {
    if (fd >= 0) ::close(fd);
  }
  // Closes now, reporting close's own error (NFS reports a failed write there).
  int close() {
    const int result = ::close(fd);
    fd = -1;
    return result;
  }
};

// Flushes a directory, so that a rename into it survives a power cut.
int sync_directory(const std::string& path) {
  FileDescriptor directory(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (directory.fd < 0) return errno;
  if (::fsync(directory.fd) != 0) return errno;
  return 0;
}

bool exists(const std::string& path) {
  struct stat status {};
  return ::stat(path.c_str(), &status) == 0;
}

// Whether cur/ holds `name` with Maildir info appended ("NAME:2,S"): the message was delivered
// and a reader has seen it.
bool in_cur(const std::string& cur, std::string_view name) {
  std::unique_ptr<DIR, int (*)(DIR*)> directory(::opendir(cur.c_str()), ::closedir);
  if (!directory) return false;
  while (const dirent* entry = ::readdir(directory.get())) {
    const std::string_view entry_name(entry->d_name);
    if (entry_name.size() > name.size() && entry_name.starts_with(name) &&
        entry_name[name.size()] == ':') {
      return true;
    }
  }
  return false;
}

}  // namespace

std::string maildir_host_name() {
  char buffer[256] = {};
  if (::gethostname(buffer, sizeof buffer - 1) != 0 || buffer[0] == '\0') {
    return "localhost";
  }
  std::string host;
  for (const char* c = buffer; *c != '\0'; ++c) {
    if (*c == '/') {
      host += "\\057";
    } else if (*c == ':') {
      host += "\\072";
    } else {
      host += *c;
    }
  }
  return host;
}

MaildirWriter::MaildirWriter(std::string directory)
    : directory_(std::move(directory)), host_(maildir_host_name()) {
  while (directory_.size() > 1 && directory_.back() == '/') directory_.pop_back();
  if (directory_.empty()) throw std::invalid_argument("a Maildir needs a directory");
}

void MaildirWriter::create_directories() const {
  for (const std::string& path :
       {directory_, directory_ + "/tmp", directory_ + "/new", directory_ + "/cur"}) {
    if (::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST) {
      throw std::runtime_error("maildir " + path + ": cannot create it: " + system_reason(errno));
    }
    struct stat status {};
    if (::stat(path.c_str(), &status) != 0 || !S_ISDIR(status.st_mode)) {
      throw std::runtime_error("maildir " + path + ": not a directory");
    }
  }
}

std::string MaildirWriter::file_name(std::string_view job_id, std::int64_t created_ms) const {
  return std::to_string(created_ms / 1000) + "." + std::string(job_id) + "." + host_;
}

SendResult MaildirWriter::deliver(std::string_view job_id, std::int64_t created_ms,
                                  std::string_view message) const {
  const std::string name = file_name(job_id, created_ms);
  const std::string temporary_path = directory_ + "/tmp/" + name;
  const std::string new_directory = directory_ + "/new";
  const std::string final_path = new_directory + "/" + name;
  const std::string where = "maildir " + directory_ + ": ";
  if (exists(final_path) || in_cur(directory_ + "/cur", name)) {
    return SendResult{SendOutcome::sent, 0, "already in " + directory_ + " as " + name};
  }

  FileDescriptor file(
      ::open(temporary_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (file.fd < 0) {
    return temporary(where + "cannot create tmp/" + name + ": " + system_reason(errno));
  }
  auto fail = [&](std::string_view step, int error) {
    ::unlink(temporary_path.c_str());
    return temporary(where + std::string(step) + " tmp/" + name + ": " + system_reason(error));
  };
  std::string_view rest = message;
  while (!rest.empty()) {
    const ssize_t written = ::write(file.fd, rest.data(), rest.size());
    if (written < 0) {
      if (errno == EINTR) continue;
      return fail("cannot write", errno);
    }
    rest.remove_prefix(static_cast<std::size_t>(written));
  }
  if (::fsync(file.fd) != 0) return fail("cannot flush", errno);
  if (file.close() != 0) return fail("cannot close", errno);
  if (::rename(temporary_path.c_str(), final_path.c_str()) != 0) {
    return fail("cannot move into new/", errno);
  }
  // The file is complete in new/ already; a failed directory flush only means a power cut
  // might lose it, and a retry then finds it and writes nothing.
  if (const int error = sync_directory(new_directory); error != 0) {
    return temporary(where + "cannot flush new/: " + system_reason(error));
  }
  return SendResult{SendOutcome::sent, 0, "written to " + final_path};
}

}  // namespace squall::mail

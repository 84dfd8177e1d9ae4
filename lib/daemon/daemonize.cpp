#include "squall/daemon/daemonize.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

namespace squall::daemon {

namespace {

std::string errno_text(int err) {
  return std::strerror(err);
}

[[noreturn]] void fail(const std::string& path, const char* what, int err) {
  throw std::runtime_error("pid file " + path + ": " + what + ": " + errno_text(err));
}

bool same_file(int fd, const std::string& path) {
  struct stat by_fd {};
  struct stat by_path {};
  if (fstat(fd, &by_fd) != 0 || stat(path.c_str(), &by_path) != 0) return false;
  return by_fd.st_dev == by_path.st_dev && by_fd.st_ino == by_path.st_ino;
}

void write_all(int fd, const char* data, std::size_t size) {
  while (size > 0) {
    const ssize_t written = ::write(fd, data, size);
    if (written < 0) {
      if (errno == EINTR) continue;
      return;
    }
    data += written;
    size -= static_cast<std::size_t>(written);
  }
}

}  // namespace

pid_t read_pid_file(int fd) {
  char buffer[32] = {};
  ssize_t n;
  do {
    n = pread(fd, buffer, sizeof buffer - 1, 0);
  } while (n < 0 && errno == EINTR);
  if (n <= 0) return 0;
  char* end = nullptr;
  const long pid = std::strtol(buffer, &end, 10);
  return pid > 0 && pid <= INT_MAX ? static_cast<pid_t>(pid) : 0;
}

PidFile::PidFile(std::string path) : path_(std::move(path)) {
  // Lock, then check that the locked file is still the one at the path: another instance may
  // have removed or replaced it between our open and our flock.
  for (int attempt = 0; attempt < 10; ++attempt) {
    const int fd = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) fail(path_, "cannot open", errno);
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      if (err == EWOULDBLOCK) {
        const pid_t holder = read_pid_file(fd);
        ::close(fd);
        throw AlreadyRunning("squalld is already running" +
                             (holder > 0 ? " as pid " + std::to_string(holder) : std::string()) +
                             " (pid file " + path_ + ")");
      }
      ::close(fd);
      fail(path_, "cannot lock", err);
    }
    if (same_file(fd, path_)) {
      fd_ = fd;
      return;
    }
    ::close(fd);
  }
  throw std::runtime_error("pid file " + path_ + ": keeps being replaced by another process");
}

PidFile::~PidFile() {
  if (fd_ < 0) return;
  // Only while it is still ours: never remove a file another instance has since locked.
  if (same_file(fd_, path_)) ::unlink(path_.c_str());
  ::close(fd_);
}

void PidFile::write(pid_t pid) {
  const std::string text = std::to_string(pid) + "\n";
  const std::string temporary = path_ + ".tmp." + std::to_string(getpid());
  const int fd =
      ::open(temporary.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) fail(temporary, "cannot create", errno);
  auto give_up = [&](const char* what) {
    const int err = errno;
    ::close(fd);
    ::unlink(temporary.c_str());
    fail(temporary, what, err);
  };
  // Nobody else knows this file yet, so the lock is immediate.
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) give_up("cannot lock");
  const ssize_t written = ::write(fd, text.data(), text.size());
  if (written != static_cast<ssize_t>(text.size())) {
    if (written >= 0) errno = EIO;
    give_up("cannot write");
  }
  if (std::rename(temporary.c_str(), path_.c_str()) != 0) give_up("cannot rename");
  // The new file is locked and in place: the old descriptor (and its lock) can go.
  ::close(fd_);
  fd_ = fd;
}

Daemonizer Daemonizer::start(const std::vector<int>& keep) {
  int report[2];
  if (pipe2(report, O_CLOEXEC) != 0) {
    throw std::runtime_error(std::string("--daemon: pipe: ") + errno_text(errno));
  }
  std::fflush(nullptr);
  const pid_t first = fork();
  if (first < 0) throw std::runtime_error(std::string("--daemon: fork: ") + errno_text(errno));
  if (first > 0) {
    // The original process: wait for the middle one, then for the daemon's report.
    ::close(report[1]);
    int status = 0;
    while (waitpid(first, &status, 0) < 0 && errno == EINTR) {
    }
    unsigned char code = 0;
    ssize_t n;
    do {
      n = ::read(report[0], &code, 1);
    } while (n < 0 && errno == EINTR);
    if (n == 1) _exit(code);
    std::fprintf(stderr, "squalld: the daemon process exited during start-up\n");
    _exit(1);
  }
  // The middle process: a new session without a controlling terminal, then fork again so the
  // daemon is not a session leader and cannot acquire one.
  ::close(report[0]);
  if (setsid() < 0) {
    std::fprintf(stderr, "squalld: --daemon: setsid: %s\n", errno_text(errno).c_str());
    _exit(1);
  }
  const pid_t second = fork();
  if (second < 0) {
    std::fprintf(stderr, "squalld: --daemon: fork: %s\n", errno_text(errno).c_str());
    _exit(1);
  }
  if (second > 0) _exit(0);

  // The daemon.
  if (chdir("/") != 0) {
    std::fprintf(stderr, "squalld: --daemon: chdir /: %s\n", errno_text(errno).c_str());
    _exit(1);
  }
  umask(027);
  const int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null >= 0) {
    dup2(null, STDIN_FILENO);
    dup2(null, STDOUT_FILENO);
    if (null > STDERR_FILENO) ::close(null);
  }
  // Close every inherited descriptor but the report pipe and the ones asked for.
  std::vector<int> kept(keep);
  kept.push_back(report[1]);
  std::sort(kept.begin(), kept.end());
  unsigned int from = 3;
  for (const int fd : kept) {
    if (fd < static_cast<int>(from)) continue;
    if (static_cast<unsigned int>(fd) > from) {
      syscall(SYS_close_range, from, static_cast<unsigned int>(fd) - 1, 0u);
    }
    from = static_cast<unsigned int>(fd) + 1;
  }
  if (syscall(SYS_close_range, from, ~0u, 0u) != 0) {
    // Kernels before 5.9: close what /proc lists.
    std::vector<int> open;
    std::error_code error;
    for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd", error)) {
      const int fd = std::atoi(entry.path().filename().c_str());
      if (fd >= static_cast<int>(from)) open.push_back(fd);
    }
    for (const int fd : open) ::close(fd);
  }
  return Daemonizer(report[1]);
}

Daemonizer::~Daemonizer() {
  if (report_fd_ >= 0) ::close(report_fd_);
}

void Daemonizer::report_ready() noexcept {
  if (report_fd_ < 0) return;
  std::fflush(stderr);
  const int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null >= 0) {
    dup2(null, STDERR_FILENO);
    ::close(null);
  }
  const unsigned char code = 0;
  write_all(report_fd_, reinterpret_cast<const char*>(&code), 1);
  ::close(report_fd_);
  report_fd_ = -1;
}

void Daemonizer::report_exit(int status) noexcept {
  if (report_fd_ < 0) return;
  const auto code = static_cast<unsigned char>(status == 0 ? 1 : status);
  write_all(report_fd_, reinterpret_cast<const char*>(&code), 1);
  ::close(report_fd_);
  report_fd_ = -1;
}

}  // namespace squall::daemon

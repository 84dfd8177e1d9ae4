// The classic Unix daemon, for systems without systemd: --daemon (double fork) and --pid-file
// (a pid file locked against a second instance).
#pragma once

#include <sys/types.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace squall::daemon {

// Another process holds the pid file's lock.
class AlreadyRunning : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A pid file that also keeps a second instance from starting: the file is locked with
// flock(LOCK_EX | LOCK_NB) for as long as this object lives (the lock goes with the descriptor,
// so a process that dies releases it and a stale file is simply taken over).
class PidFile {
 public:
  // Opens or creates `path` (which should be absolute) and locks it. Throws AlreadyRunning
  // ("squalld is already running as pid N (pid file PATH)") if another process holds the lock,
  // std::runtime_error naming the path and the reason for anything else.
  explicit PidFile(std::string path);
  // Removes the file if it is still the one this process locked, and releases the lock.
  ~PidFile();
  PidFile(const PidFile&) = delete;
  PidFile& operator=(const PidFile&) = delete;

  // Writes "PID\n" atomically: a new file, locked before it is renamed over the path, so a
  // reader never sees it empty or half written and the lock is never let go. Throws
  // std::runtime_error naming the path.
  void write(pid_t pid);

  const std::string& path() const noexcept { return path_; }
  // The locked descriptor (kept open across daemonize()).
  int fd() const noexcept { return fd_; }

 private:
  std::string path_;
  int fd_ = -1;  // Locked; refers to the file at path_.
};

// The pid in a pid file, or 0 if it holds none.
pid_t read_pid_file(int fd);

// Detaches the process (--daemon): fork; setsid in the child; fork again so the daemon can
// never reacquire a terminal; chdir("/"); umask(027); stdin and stdout to /dev/null; every
// descriptor >= 3 closed except `keep`. Returns in the daemon only. The original process stays
// in the foreground until the daemon calls report_ready() or report_exit(), and exits with the
// daemon's status (1 if the daemon dies first), so a failed start is visible to whoever ran it.
// Call before any thread is started (fork copies only the calling thread).
class Daemonizer {
 public:
  static Daemonizer start(const std::vector<int>& keep);
  Daemonizer(Daemonizer&& other) noexcept : report_fd_(other.report_fd_) { other.report_fd_ = -1; }
  Daemonizer(const Daemonizer&) = delete;
  Daemonizer& operator=(const Daemonizer&) = delete;
  ~Daemonizer();

  // Start-up finished: stderr goes to /dev/null too and the waiting process exits 0. Until
  // then, stderr still reaches whoever started squalld, so start-up errors show there.
  void report_ready() noexcept;
  // The daemon is exiting with `status` before it was ready (no-op after report_ready()).
  void report_exit(int status) noexcept;

 private:
  explicit Daemonizer(int report_fd) : report_fd_(report_fd) {}
  int report_fd_ = -1;  // The pipe to the waiting process, until a report is sent.
};

}  // namespace squall::daemon

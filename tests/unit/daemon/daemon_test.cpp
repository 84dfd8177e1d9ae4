// lib/daemon: the pid file and its lock, sd_notify messages, inherited sockets, the watchdog.
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "core/handle_lifetime.hpp"
#include "squall/core/loop.hpp"
#include "squall/daemon/daemonize.hpp"
#include "squall/daemon/systemd.hpp"
#include "test_support.hpp"

using namespace squall;
namespace fs = std::filesystem;
using squall::testing::read_file;
using squall::testing::TempDir;

namespace {

// Sets (or unsets, for nullopt) an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, std::optional<std::string> value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) {
      setenv(name, value->c_str(), 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// A unix datagram socket playing systemd's notify socket.
class NotifyReceiver {
 public:
  explicit NotifyReceiver(const std::string& address) {
    fd_ = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd_ >= 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    socklen_t length;
    if (address.front() == '@') {  // Abstract namespace, as systemd writes it.
      std::memcpy(sa.sun_path + 1, address.data() + 1, address.size() - 1);
      length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + address.size());
    } else {
      std::memcpy(sa.sun_path, address.data(), address.size());
      length = sizeof sa;
    }
    REQUIRE(bind(fd_, reinterpret_cast<sockaddr*>(&sa), length) == 0);
    timeval timeout{1, 0};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  }
  ~NotifyReceiver() { close(fd_); }

  // The next datagram, or "" after a second without one.
  std::string receive() {
    char buffer[4096];
    const ssize_t n = recv(fd_, buffer, sizeof buffer, 0);
    return n > 0 ? std::string(buffer, static_cast<std::size_t>(n)) : std::string();
  }
  // Every datagram already queued.
  std::vector<std::string> drain() {
    std::vector<std::string> out;
    char buffer[4096];
    for (;;) {
      const ssize_t n = recv(fd_, buffer, sizeof buffer, MSG_DONTWAIT);
      if (n <= 0) break;
      out.emplace_back(buffer, static_cast<std::size_t>(n));
    }
    return out;
  }

 private:
  int fd_ = -1;
};

std::string abstract_name(const char* what) {
  return "@squall-test-" + std::string(what) + "-" + std::to_string(getpid());
}

// A TCP socket on 127.0.0.1, port 0; listening if asked.
int tcp_socket(bool listening) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0);
  if (listening) REQUIRE(listen(fd, 8) == 0);
  return fd;
}

// Puts `fd` at descriptor 3 (SD_LISTEN_FDS_START) for one scope, restoring what was there.
class AtFd3 {
 public:
  explicit AtFd3(int fd) {
    saved_ = fcntl(3, F_GETFD) >= 0 ? fcntl(3, F_DUPFD_CLOEXEC, 10) : -1;
    REQUIRE(dup2(fd, 3) == 3);
  }
  ~AtFd3() {
    if (saved_ >= 0) {
      dup2(saved_, 3);
      fcntl(3, F_SETFD, FD_CLOEXEC);
      close(saved_);
    } else {
      close(3);
    }
  }

 private:
  int saved_ = -1;
};

}  // namespace

TEST_CASE("a pid file holds the pid, locks out a second instance and is removed") {
  TempDir dir;
  const std::string path = (dir.path / "squalld.pid").string();
  {
    daemon::PidFile first(path);
    CHECK(fs::exists(path));
    // Not written yet: still locked, the message has no pid.
    try {
      daemon::PidFile second(path);
      FAIL("a second lock succeeded");
    } catch (const daemon::AlreadyRunning& error) {
      CHECK(std::string(error.what()) == "squalld is already running (pid file " + path + ")");
    }
    first.write(getpid());
    CHECK(read_file(path) == std::to_string(getpid()) + "\n");
    CHECK(daemon::read_pid_file(first.fd()) == getpid());
    try {
      daemon::PidFile second(path);
      FAIL("a second lock succeeded");
    } catch (const daemon::AlreadyRunning& error) {
      CHECK(std::string(error.what()) == "squalld is already running as pid " +
                                             std::to_string(getpid()) + " (pid file " + path + ")");
    }
    // The failed attempt left the file alone.
    CHECK(read_file(path) == std::to_string(getpid()) + "\n");
    // Rewriting keeps the lock (the new file is locked before it replaces the old one).
    first.write(12345);
    CHECK(read_file(path) == "12345\n");
    CHECK_THROWS_AS(daemon::PidFile{path}, daemon::AlreadyRunning);
    // No temporary file is left behind.
    CHECK(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);
  }
  CHECK_FALSE(fs::exists(path));
}

TEST_CASE("a stale pid file, not locked by anyone, is taken over") {
  TempDir dir;
  const std::string path = (dir.path / "squalld.pid").string();
  std::ofstream(path) << "999999\n";
  daemon::PidFile pid_file(path);
  pid_file.write(getpid());
  CHECK(read_file(path) == std::to_string(getpid()) + "\n");
}

TEST_CASE("a pid file that cannot be created names the path") {
  try {
    daemon::PidFile pid_file("/nonexistent-squall-dir/squalld.pid");
    FAIL("no error");
  } catch (const std::runtime_error& error) {
    const std::string message = error.what();
    CHECK(message.find("/nonexistent-squall-dir/squalld.pid") != std::string::npos);
    CHECK(message.find("No such file or directory") != std::string::npos);
  }
}

TEST_CASE("under_systemd looks at NOTIFY_SOCKET and INVOCATION_ID") {
  {
    ScopedEnv notify("NOTIFY_SOCKET", std::nullopt);
    ScopedEnv invocation("INVOCATION_ID", std::nullopt);
    CHECK_FALSE(daemon::under_systemd());
  }
  {
    ScopedEnv notify("NOTIFY_SOCKET", "/run/systemd/notify");
    ScopedEnv invocation("INVOCATION_ID", std::nullopt);
    CHECK(daemon::under_systemd());
  }
  {
    ScopedEnv notify("NOTIFY_SOCKET", std::nullopt);
    ScopedEnv invocation("INVOCATION_ID", "0123456789abcdef0123456789abcdef");
    CHECK(daemon::under_systemd());
  }
}

TEST_CASE("notifications reach NOTIFY_SOCKET in sd_notify's format") {
  for (bool abstract : {false, true}) {
    CAPTURE(abstract);
    TempDir dir;
    const std::string address =
        abstract ? abstract_name("notify") : (dir.path / "notify.sock").string();
    NotifyReceiver receiver(address);
    ScopedEnv notify("NOTIFY_SOCKET", address);

    CHECK(daemon::notify_ready("Serving on 127.0.0.1:8080"));
    CHECK(receiver.receive() == "READY=1\nSTATUS=Serving on 127.0.0.1:8080");
    CHECK(daemon::notify_status("two\nlines"));
    CHECK(receiver.receive() == "STATUS=two lines");  // A status is one line.
    CHECK(daemon::notify_stopping("Draining 3 connection(s)"));
    CHECK(receiver.receive() == "STOPPING=1\nSTATUS=Draining 3 connection(s)");
    CHECK(daemon::notify_stopping("Draining", std::chrono::seconds(25)));
    CHECK(receiver.receive() == "STOPPING=1\nEXTEND_TIMEOUT_USEC=25000000\nSTATUS=Draining");

    const std::uint64_t before = daemon::monotonic_usec();
    CHECK(daemon::notify_reloading("Reloading"));
    const std::uint64_t after = daemon::monotonic_usec();
    const std::string reloading = receiver.receive();
    REQUIRE(reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="));
    const std::size_t end = reloading.find('\n', 12);
    REQUIRE(end != std::string::npos);
    const std::uint64_t usec = std::stoull(reloading.substr(27, end - 27));
    CHECK(before <= usec);
    CHECK(usec <= after);
    CHECK(reloading.substr(end) == "\nSTATUS=Reloading");
    // NOTIFY_SOCKET stays set for the next notification.
    CHECK(std::getenv("NOTIFY_SOCKET") != nullptr);
  }
}

TEST_CASE("notifications are no-ops without NOTIFY_SOCKET") {
  ScopedEnv notify("NOTIFY_SOCKET", std::nullopt);
  CHECK_FALSE(daemon::notify_ready("x"));
  CHECK_FALSE(daemon::notify("WATCHDOG=1"));
}

TEST_CASE("monotonic_usec is CLOCK_MONOTONIC in microseconds") {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  const auto expected = static_cast<std::uint64_t>(now.tv_sec) * 1'000'000u +
                        static_cast<std::uint64_t>(now.tv_nsec) / 1'000u;
  const std::uint64_t got = daemon::monotonic_usec();
  CHECK(got >= expected);
  CHECK(got - expected < 1'000'000u);
}

TEST_CASE("listen_fds adopts a listening socket passed at descriptor 3, with its name") {
  const int fd = tcp_socket(true);
  {
    AtFd3 at3(fd);
    fcntl(3, F_SETFD, 0);
    ScopedEnv pid("LISTEN_PID", std::to_string(getpid()));
    ScopedEnv fds("LISTEN_FDS", "1");
    ScopedEnv names("LISTEN_FDNAMES", "http");
    const std::vector<daemon::ListenFd> passed = daemon::listen_fds();
    REQUIRE(passed.size() == 1);
    CHECK(passed[0].fd == 3);
    CHECK(passed[0].name == "http");
    // The variables are gone (children must not see them) and the descriptor is close-on-exec.
    CHECK(std::getenv("LISTEN_PID") == nullptr);
    CHECK(std::getenv("LISTEN_FDS") == nullptr);
    CHECK(std::getenv("LISTEN_FDNAMES") == nullptr);
    CHECK((fcntl(3, F_GETFD) & FD_CLOEXEC) != 0);
    // Called again, nothing is passed any more.
    CHECK(daemon::listen_fds().empty());
  }
  close(fd);
}

TEST_CASE("listen_fds ignores sockets meant for another process") {
  ScopedEnv pid("LISTEN_PID", std::to_string(getpid() + 1));
  ScopedEnv fds("LISTEN_FDS", "1");
  CHECK(daemon::listen_fds().empty());
  CHECK(std::getenv("LISTEN_FDS") == nullptr);
}

TEST_CASE("listen_fds refuses a socket that is not listening") {
  const int fd = tcp_socket(false);
  {
    AtFd3 at3(fd);
    ScopedEnv pid("LISTEN_PID", std::to_string(getpid()));
    ScopedEnv fds("LISTEN_FDS", "1");
    ScopedEnv names("LISTEN_FDNAMES", std::nullopt);
    try {
      daemon::listen_fds();
      FAIL("no error");
    } catch (const std::runtime_error& error) {
      CHECK(
          std::string(error.what())
              .starts_with(
                  "descriptor 3 (\"unknown\") passed by systemd is not a listening stream socket"));
    }
  }
  close(fd);
}

TEST_CASE("without LISTEN_FDS nothing is inherited") {
  ScopedEnv pid("LISTEN_PID", std::nullopt);
  ScopedEnv fds("LISTEN_FDS", std::nullopt);
  CHECK(daemon::listen_fds().empty());
}

TEST_CASE("the watchdog pings from the loop at half of WATCHDOG_USEC") {
  const std::string address = abstract_name("watchdog");
  NotifyReceiver receiver(address);
  ScopedEnv notify("NOTIFY_SOCKET", address);
  ScopedEnv usec("WATCHDOG_USEC", "100000");
  ScopedEnv pid("WATCHDOG_PID", std::to_string(getpid()));
  Loop loop;
  std::size_t pings = 0;
  {
    daemon::Watchdog watchdog(loop);
    CHECK(watchdog.enabled());
    CHECK(watchdog.interval() == std::chrono::microseconds(50'000));
    CHECK(std::getenv("WATCHDOG_USEC") == nullptr);  // Unset for children.
    CHECK(std::getenv("WATCHDOG_PID") == nullptr);
    loop.call_later(std::chrono::milliseconds(275), [&] { loop.stop(); });
    loop.run();
    for (const std::string& message : receiver.drain()) {
      CHECK(message == "WATCHDOG=1");
      ++pings;
    }
  }
  // One at once, then one every 50 ms: 6 in 275 ms, give or take scheduling.
  CHECK(pings >= 4);
  CHECK(pings <= 7);
  CHECK(loop.close() == 0);
}

TEST_CASE("the watchdog stays off for another process's WATCHDOG_PID or without WATCHDOG_USEC") {
  Loop loop;
  {
    ScopedEnv usec("WATCHDOG_USEC", "100000");
    ScopedEnv pid("WATCHDOG_PID", std::to_string(getpid() + 1));
    daemon::Watchdog watchdog(loop);
    CHECK_FALSE(watchdog.enabled());
    CHECK(std::getenv("WATCHDOG_USEC") == nullptr);
  }
  {
    ScopedEnv usec("WATCHDOG_USEC", std::nullopt);
    daemon::Watchdog watchdog(loop);
    CHECK_FALSE(watchdog.enabled());
  }
  CHECK(loop.close() == 0);
}

TEST_CASE("the watchdog's timer is closed once, whether the watchdog or its loop ends first") {
  // Destroying the watchdog after Loop::close() closed its timer a second time before.
  const std::string address = abstract_name("watchdog-orders");
  NotifyReceiver receiver(address);
  ScopedEnv notify("NOTIFY_SOCKET", address);
  testing::check_every_end_order([](Loop& loop) {
    // Watchdog unsets both variables: set them for each one.
    ScopedEnv usec("WATCHDOG_USEC", "100000");
    ScopedEnv pid("WATCHDOG_PID", std::to_string(getpid()));
    auto watchdog = std::make_unique<daemon::Watchdog>(loop);
    CHECK(watchdog->enabled());
    return watchdog;
  });
}

TEST_CASE("stderr_is_journal compares JOURNAL_STREAM with stderr's device and inode") {
  struct stat status {};
  REQUIRE(fstat(STDERR_FILENO, &status) == 0);
  {
    ScopedEnv stream("JOURNAL_STREAM",
                     std::to_string(status.st_dev) + ":" + std::to_string(status.st_ino));
    CHECK(daemon::stderr_is_journal());
  }
  {
    ScopedEnv stream("JOURNAL_STREAM",
                     std::to_string(status.st_dev) + ":" + std::to_string(status.st_ino + 1));
    CHECK_FALSE(daemon::stderr_is_journal());
  }
  {
    ScopedEnv stream("JOURNAL_STREAM", std::nullopt);
    CHECK_FALSE(daemon::stderr_is_journal());
  }
}

#include "squall/daemon/systemd.hpp"

#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <stdexcept>

#include <spdlog/spdlog.h>
#include <systemd/sd-daemon.h>

namespace squall::daemon {

namespace {

bool env_set(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0';
}

// A STATUS= value is one line: newlines would start new assignments.
std::string one_line(std::string_view text) {
  std::string out(text);
  for (char& c : out) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return out;
}

std::string with_status(std::string_view head, std::string_view status) {
  std::string state(head);
  if (!state.empty()) state += '\n';
  state += "STATUS=";
  state += one_line(status);
  return state;
}

}  // namespace

bool under_systemd() {
  return env_set("NOTIFY_SOCKET") || env_set("INVOCATION_ID");
}

bool stderr_is_journal() {
  const char* value = std::getenv("JOURNAL_STREAM");
  if (value == nullptr) return false;
  unsigned long long device = 0;
  unsigned long long inode = 0;
  if (std::sscanf(value, "%llu:%llu", &device, &inode) != 2) return false;
  struct stat status {};
  if (fstat(STDERR_FILENO, &status) != 0) return false;
  return status.st_dev == device && status.st_ino == inode;
}

std::uint64_t monotonic_usec() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<std::uint64_t>(now.tv_sec) * 1'000'000u +
         static_cast<std::uint64_t>(now.tv_nsec) / 1'000u;
}

bool notify(std::string_view state) {
  if (!env_set("NOTIFY_SOCKET")) return false;
  const std::string text(state);
  const int result = sd_notify(0, text.c_str());
  if (result < 0) {
    spdlog::warn("sd_notify({}) failed: {}", one_line(text), std::strerror(-result));
    return false;
  }
  return result > 0;
}

bool notify_ready(std::string_view status) {
  return notify(with_status("READY=1", status));
}

bool notify_status(std::string_view status) {
  return notify(with_status("", status));
}

bool notify_reloading(std::string_view status) {
  // MONOTONIC_USEC lets systemd (notify-reload) match this to the reload it asked for.
  return notify(
      with_status("RELOADING=1\nMONOTONIC_USEC=" + std::to_string(monotonic_usec()), status));
}

bool notify_stopping(std::string_view status, std::chrono::microseconds expected) {
  std::string head = "STOPPING=1";
  if (expected.count() > 0) head += "\nEXTEND_TIMEOUT_USEC=" + std::to_string(expected.count());
  return notify(with_status(head, status));
}

std::vector<ListenFd> listen_fds() {
  char** names = nullptr;
  const int count = sd_listen_fds_with_names(1, &names);
  std::vector<ListenFd> fds;
  if (count < 0) {
    throw std::runtime_error(std::string("cannot read the sockets passed by systemd "
                                         "(LISTEN_FDS): ") +
                             std::strerror(-count));
  }
  for (int i = 0; i < count; ++i) {
    const int fd = SD_LISTEN_FDS_START + i;
    std::string name = names != nullptr && names[i] != nullptr ? names[i] : "unknown";
    fds.push_back({fd, name});
  }
  if (names != nullptr) {
    for (int i = 0; i < count; ++i) std::free(names[i]);
    std::free(names);
  }
  for (const ListenFd& passed : fds) {
    const int listening = sd_is_socket(passed.fd, AF_UNSPEC, SOCK_STREAM, 1);
    if (listening <= 0) {
      throw std::runtime_error(
          "descriptor " + std::to_string(passed.fd) + " (\"" + passed.name +
          "\") passed by systemd is not a listening stream socket" +
          (listening < 0 ? std::string(": ") + std::strerror(-listening) : std::string()) +
          " (use ListenStream= in the .socket unit)");
    }
    int family = 0;
    socklen_t length = sizeof family;
    if (getsockopt(passed.fd, SOL_SOCKET, SO_DOMAIN, &family, &length) == 0 && family != AF_INET &&
        family != AF_INET6) {
      throw std::runtime_error("descriptor " + std::to_string(passed.fd) + " (\"" + passed.name +
                               "\") passed by systemd is not a TCP socket (squalld serves "
                               "IPv4 and IPv6 only)");
    }
  }
  return fds;
}

Watchdog::Watchdog(Loop& loop) : Watchdog(loop, nullptr) {}

Watchdog::Watchdog(Loop& loop, std::function<bool()> alive) : alive_(std::move(alive)) {
  std::uint64_t usec = 0;
  // Unsets WATCHDOG_USEC and WATCHDOG_PID; returns 0 when WATCHDOG_PID names another process.
  const int enabled = sd_watchdog_enabled(1, &usec);
  if (enabled < 0) {
    spdlog::warn("systemd watchdog settings are invalid ({}): watchdog disabled",
                 std::strerror(-enabled));
    return;
  }
  if (enabled == 0 || usec == 0) return;
  interval_ = std::chrono::microseconds(usec / 2);
  const std::uint64_t period_ms = std::max<std::uint64_t>(1, usec / 2 / 1000);
  timer_ = UvHandle<uv_timer_t>(loop, &alive_, uv_timer_init, "watchdog timer");
  uv_unref(timer_.handle());
  uv_timer_start(
      timer_.get(),
      [](uv_timer_t* timer) {
        const auto* alive = static_cast<const std::function<bool()>*>(timer->data);
        if (!*alive || (*alive)()) sd_notify(0, "WATCHDOG=1");
      },
      period_ms, period_ms);
  sd_notify(0, "WATCHDOG=1");
  spdlog::info("systemd watchdog: pinging every {} ms (WatchdogSec {} ms)", period_ms, usec / 1000);
}

// The timer closes (or, after Loop::close(), is freed) by itself.
Watchdog::~Watchdog() = default;

}  // namespace squall::daemon

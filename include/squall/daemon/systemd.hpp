// systemd integration through libsystemd (sd-daemon(3)): readiness and status notifications,
// the watchdog, inherited listening sockets. Every function is a no-op (or returns nothing)
// when the process does not run under systemd, so callers never need to check first.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include <uv.h>

#include "squall/core/loop.hpp"
#include "squall/core/uv_handle.hpp"

namespace squall::daemon {

// Whether systemd started this process: NOTIFY_SOCKET or INVOCATION_ID is set. A process
// started by systemd must never fork into the background (the notify socket would see the wrong
// pid), so --daemon is refused when this is true.
bool under_systemd();

// Whether stderr is connected to the journal: JOURNAL_STREAM names the device and inode of
// stderr (systemd.exec(5)). Then log lines carry "<N>" priority prefixes and no timestamps.
bool stderr_is_journal();

// CLOCK_MONOTONIC in microseconds, as MONOTONIC_USEC= expects.
std::uint64_t monotonic_usec();

// Sends `state` (newline-separated KEY=VALUE assignments) to $NOTIFY_SOCKET. Returns true if it
// was sent, false when there is no notify socket; a send error is logged and returns false.
// NOTIFY_SOCKET stays in the environment so later notifications work.
bool notify(std::string_view state);

// READY=1 with a STATUS= line: startup finished or a reload ended (successfully or not).
bool notify_ready(std::string_view status);
// STATUS= only: what the daemon is doing.
bool notify_status(std::string_view status);
// RELOADING=1, MONOTONIC_USEC=<now> and STATUS=: a reload starts; READY=1 must follow.
bool notify_reloading(std::string_view status);
// STOPPING=1 and STATUS=: draining has started. A non-zero `expected` also sends
// EXTEND_TIMEOUT_USEC=, so that systemd waits at least that long from now (TimeoutStopSec= can
// only be extended this way, never shortened): the drain deadline plus a margin.
bool notify_stopping(std::string_view status,
                     std::chrono::microseconds expected = std::chrono::microseconds(0));

// One socket systemd passed (socket activation).
struct ListenFd {
  int fd;            // 3, 4, ...
  std::string name;  // From LISTEN_FDNAMES (FileDescriptorName=), "unknown" when unnamed.
};

// The listening sockets passed through LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, if LISTEN_PID is
// this process; the variables are removed from the environment either way, so children never
// see them. Each descriptor gets FD_CLOEXEC. Throws std::runtime_error naming the descriptor
// if one is not a listening stream socket (a .socket unit with ListenDatagram=, say).
std::vector<ListenFd> listen_fds();

// Pings WATCHDOG=1 from a timer on the loop thread every half of WATCHDOG_USEC, so a stuck loop
// stops the pings and systemd restarts the service. Disabled (no timer) unless WATCHDOG_USEC is
// set and WATCHDOG_PID, if set, is this process; both variables are removed from the
// environment. Create it once the daemon is ready; it may outlive the loop.
class Watchdog {
 public:
  explicit Watchdog(Loop& loop);
  // Pings only while `alive()` says the other loops also run (each proves it with a heartbeat
  // of its own): one stuck loop among several stops the pings as well. Loop thread.
  Watchdog(Loop& loop, std::function<bool()> alive);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  bool enabled() const noexcept { return static_cast<bool>(timer_); }
  // The ping period: half of WATCHDOG_USEC (zero when disabled).
  std::chrono::microseconds interval() const noexcept { return interval_; }

 private:
  std::function<bool()> alive_;  // Checked before each ping; empty = always.
  UvHandle<uv_timer_t> timer_;   // The ping timer (data -> alive_); empty when disabled.
  std::chrono::microseconds interval_{0};
};

}  // namespace squall::daemon

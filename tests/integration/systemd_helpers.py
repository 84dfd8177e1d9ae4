"""Playing systemd (and a shell) for squalld's daemon tests: a notify socket that records what
squalld tells systemd, a process harness with a chosen environment and inherited descriptors,
and a watcher for a --daemon process that is not our child. Standard library only; the HTTP
side comes from squall_helpers."""

from __future__ import annotations

import itertools
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from squall_helpers import REPO, Conn, Squalld, request, squalld_path

# Variables through which systemd talks to a service: never inherited from whatever runs the
# tests, only set by a test on purpose.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "INVOCATION_ID", "JOURNAL_STREAM", "LISTEN_PID",
                     "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID")

SERVING_RE = re.compile(r"Serving on (\S+?):(\d+)\b")
_counter = itertools.count()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def free_port(host="127.0.0.1") -> int:
    """A port nobody listens on right now (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def clean_environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def http_get(port, target="/plaintext", host="127.0.0.1", timeout=5.0):
    with Conn(port, host=host, timeout=timeout) as c:
        c.send(request("GET", target))
        return c.read_response()


def is_refused(port, host="127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            return True
        return False


class Notification:
    def __init__(self, raw: bytes, pid: int | None, received: float):
        self.raw = raw
        self.pid = pid  # The sender, from SCM_CREDENTIALS.
        self.received = received  # time.monotonic() when read.
        self.fields = {}
        for line in raw.decode("utf-8", "replace").split("\n"):
            key, _, value = line.partition("=")
            if key:
                self.fields[key] = value

    def get(self, key, default=None):
        return self.fields.get(key, default)

    def __contains__(self, key):
        return key in self.fields

    def __repr__(self):
        return f"Notification({self.raw!r}, pid={self.pid})"


class NotifySocket:
    """systemd's side of NOTIFY_SOCKET: an abstract unix datagram socket (no path-length
    worries) that records every message with its sender's pid and arrival time."""

    def __init__(self):
        self.name = f"squall-test-notify-{os.getpid()}-{next(_counter)}"
        self.address = "@" + self.name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.2)
        self.messages: list[Notification] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self):
        credentials_size = socket.CMSG_SPACE(struct.calcsize("3i"))
        while not self._closed:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, credentials_size)
            except socket.timeout:
                continue
            except OSError:
                break
            received = time.monotonic()
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            with self._cond:
                self.messages.append(Notification(data, pid, received))
                self._cond.notify_all()

    def close(self):
        self._closed = True
        self._thread.join(2)
        self.sock.close()

    def __len__(self):
        with self._cond:
            return len(self.messages)

    def snapshot(self) -> list[Notification]:
        with self._cond:
            return list(self.messages)

    def wait_for(self, key, value=None, timeout=5.0, start=0) -> tuple[int, Notification]:
        """The first message (index >= start) with `key` (equal to `value` if given).
        Returns (index, message)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(start, len(self.messages)):
                    m = self.messages[i]
                    if key in m and (value is None or m.get(key) == value):
                        return i, m
                start = max(start, len(self.messages))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {key}={value or '*'} notification within {timeout}s;"
                                         f" got {self.messages!r}")
                self._cond.wait(remaining)

    def wait_ready(self, timeout=10.0, start=0) -> tuple[int, Notification]:
        return self.wait_for("READY", "1", timeout=timeout, start=start)


class Daemon(Squalld):
    """One squalld process for the daemon tests: no access log, ports read from the port file,
    started with a clean environment (NOTIFY_SOCKET, LISTEN_FDS, JOURNAL_STREAM as the test
    asks). stderr is read through a pipe of ours, so JOURNAL_STREAM can name it."""

    def __init__(self, workdir: Path, config: dict | None = None, args=(), name="squalld",
                 allow_errors=False):
        super().__init__(workdir, config, args, name=name, allow_errors=allow_errors)
        self.notify: NotifySocket | None = None

    def base_config(self) -> dict:
        base = super().base_config()
        base["log"]["access_log"] = "off"
        return base

    def start(self, notify: NotifySocket | None = None, env: dict | None = None,
              journal=False, wait_ready=True, command=None, pass_fds=(), preexec_fn=None,
              timeout=10.0):
        """Starts squalld with a clean environment plus `env`; with `notify`, NOTIFY_SOCKET
        points at it and start() returns once READY=1 arrived."""
        self.notify = notify
        extra = dict(env or {})
        if notify is not None:
            extra["NOTIFY_SOCKET"] = notify.address
        read_end, write_end = os.pipe()
        if journal:
            st = os.fstat(write_end)
            extra["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        try:
            self.proc = subprocess.Popen(command or self.command(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=write_end,
                                         cwd=self.workdir, env=clean_environment(**extra),
                                         pass_fds=pass_fds, preexec_fn=preexec_fn)
        finally:
            os.close(write_end)
        self._reader = threading.Thread(target=self._read_stderr,
                                        args=(os.fdopen(read_end, "rb"),), daemon=True)
        self._reader.start()
        if notify is not None and wait_ready:
            try:
                self.ready_index, self.ready = notify.wait_ready(timeout=timeout)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{self.stderr_text()}") from None
        return self

    # -- addresses -----------------------------------------------------------------------------

    def bound(self) -> list[tuple[str, int]]:
        """The addresses of the port file squalld wrote at start."""
        out = []
        for line in self.port_file.read_text().split():
            host, _, port = line.rpartition(":")
            out.append((host.strip("[]"), int(port)))
        return out

    @property
    def port(self) -> int:
        return self.bound()[0][1]

    # -- process -------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    def reload(self, timeout=5.0) -> tuple[Notification, Notification]:
        """SIGHUP; returns the RELOADING=1 and the READY=1 notifications that follow it."""
        start = len(self.notify)
        self.signal(signal.SIGHUP)
        i, reloading = self.notify.wait_for("RELOADING", "1", timeout=timeout, start=start)
        _, ready = self.notify.wait_ready(timeout=timeout, start=i + 1)
        return reloading, ready


class DaemonFactory:
    """Makes Daemons (and notify sockets) for one test, and cleans them all up."""

    def __init__(self, base: Path):
        self.base = base
        self.daemons: list[Daemon] = []
        self.sockets: list[NotifySocket] = []

    def __call__(self, config=None, args=(), **kwargs) -> Daemon:
        daemon = Daemon(self.base / f"squalld-{len(self.daemons) + 1}", config=config,
                        args=args, name=f"squalld-{len(self.daemons) + 1}", **kwargs)
        self.daemons.append(daemon)
        return daemon

    def notify_socket(self) -> NotifySocket:
        s = NotifySocket()
        self.sockets.append(s)
        return s

    def close(self):
        for daemon in self.daemons:
            daemon.kill()
        for s in self.sockets:
            s.close()


@pytest.fixture
def daemons(tmp_path):
    factory = DaemonFactory(tmp_path)
    yield factory
    factory.close()


class ExitWatcher:
    """Waits for a process that is not our child (a --daemon) to exit, through a pidfd."""

    def __init__(self, pid: int):
        self.pid = pid
        self.fd = os.pidfd_open(pid)

    def wait(self, timeout=10.0) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return bool(ready)

    def close(self):
        os.close(self.fd)


def pid_alive(pid: int) -> bool:
    """Running (not a zombie waiting for a reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat fields after the command name: [state, ppid, pgrp, session, ...]."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def systemd_analyze() -> str | None:
    return shutil.which("systemd-analyze")


def render_units(directory: Path, binary: str) -> list[Path]:
    """The unit files as `make install` writes them, with ExecStart pointing at `binary`."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ("squalld.service", "squalld.socket"):
        text = (REPO / "systemd" / name).read_text().replace("/usr/local/bin/squalld", binary)
        path = directory / name
        path.write_text(text)
        out.append(path)
    return out


__all__ = ["Daemon", "DaemonFactory", "ExitWatcher", "NotifySocket", "Notification",
           "clean_environment", "daemons", "free_port", "http_get", "is_refused",
           "monotonic_usec", "pid_alive", "proc_stat", "render_units", "systemd_analyze"]

"""squalld under systemd, with the tests playing systemd: READY/STATUS/RELOADING/STOPPING on a
notify socket, the watchdog, socket activation, journal log lines, and the unit files."""

import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from squall_helpers import REPO, squalld_path
from systemd_helpers import (SERVING_RE, daemons, free_port, http_get, is_refused,  # noqa: F401
                             monotonic_usec, render_units, systemd_analyze)


def test_ready_after_listening_with_status(daemons):
    notify = daemons.notify_socket()
    srv = daemons().start(notify=notify)
    ready = srv.ready
    assert ready.pid == srv.pid, ready
    # READY comes with a STATUS naming the bound address; the port answers at once.
    m = SERVING_RE.search(ready.get("STATUS", ""))
    assert m, ready
    assert int(m.group(2)) == srv.port
    assert http_get(srv.port).status == 200
    # A STATUS line came before READY (start-up), and READY came exactly once.
    before = notify.snapshot()[:srv.ready_index]
    assert any("STATUS" in n and "READY" not in n for n in before), before
    assert sum(1 for n in notify.snapshot() if n.get("READY") == "1") == 1
    srv.stop()


def test_stopping_when_draining_starts(daemons):
    notify = daemons.notify_socket()
    srv = daemons().start(notify=notify)
    start = len(notify)
    srv.signal(signal.SIGTERM)
    _, stopping = notify.wait_for("STOPPING", "1", start=start)
    assert "Draining" in stopping.get("STATUS", ""), stopping
    # systemd is asked to wait for the drain deadline (5 s here) plus a margin.
    assert int(stopping.get("EXTEND_TIMEOUT_USEC")) == 10_000_000, stopping
    assert srv.wait_exit() == 0, srv.stderr_text()
    srv.stop()


def test_reloading_then_ready_around_sighup(daemons):
    notify = daemons.notify_socket()
    srv = daemons().start(notify=notify)
    before = monotonic_usec()
    reloading, ready = srv.reload()
    after = monotonic_usec()
    # MONOTONIC_USEC is CLOCK_MONOTONIC at the reload, so systemd can match it.
    stamp = int(reloading.get("MONOTONIC_USEC"))
    assert before <= stamp <= after, (before, stamp, after)
    assert "reloaded" in ready.get("STATUS", ""), ready
    assert http_get(srv.port).status == 200
    srv.stop()


def test_failed_reload_still_sends_ready_with_the_error(daemons):
    notify = daemons.notify_socket()
    srv = daemons(allow_errors=True)
    srv.start(notify=notify)
    srv.write_config({"limits": {"max_body_bytes": "lots"}})
    _, ready = srv.reload()
    status = ready.get("STATUS", "")
    assert status.startswith("Reload failed: "), ready
    assert "squalld.toml:" in status and "max_body_bytes" in status, ready
    assert http_get(srv.port).status == 200
    srv.stop()


def test_watchdog_pings_at_half_the_interval_and_stop_while_the_loop_is_stopped(daemons):
    notify = daemons.notify_socket()
    srv = daemons().start(notify=notify, env={"WATCHDOG_USEC": "400000"})
    srv.wait_for_line("systemd watchdog: pinging every 200 ms")

    def pings_after(index, count, timeout):
        got = []
        while len(got) < count:
            index, ping = notify.wait_for("WATCHDOG", "1", timeout=timeout, start=index)
            got.append(ping)
            index += 1
        return index, got

    index, pings = pings_after(srv.ready_index, 6, timeout=3)
    assert all(p.pid == srv.pid for p in pings)
    gaps = [b.received - a.received for a, b in zip(pings[1:], pings[2:])]
    assert all(0.1 <= gap <= 0.4 for gap in gaps), gaps
    average = sum(gaps) / len(gaps)
    assert 0.15 <= average <= 0.3, gaps

    # A stopped loop sends nothing: SIGSTOP freezes it, as a stuck handler would.
    os.kill(srv.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    time.sleep(1.0)  # what is checked is an absence: it takes waiting
    resumed = time.monotonic()
    os.kill(srv.pid, signal.SIGCONT)
    during = [n for n in notify.snapshot()
              if "WATCHDOG" in n and stopped + 0.1 < n.received < resumed]
    assert not during, during
    # And the pings resume.
    _, late = notify.wait_for("WATCHDOG", "1", timeout=2, start=len(notify))
    assert late.received >= resumed
    assert http_get(srv.port).status == 200
    srv.stop()


def test_watchdog_for_another_pid_is_ignored(daemons):
    notify = daemons.notify_socket()
    srv = daemons().start(notify=notify, env={"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    time.sleep(0.5)  # five ping periods: none may come
    assert not [n for n in notify.snapshot() if "WATCHDOG" in n]
    srv.stop()


def test_no_notifications_without_notify_socket(daemons):
    srv = daemons().start()
    srv.wait_for_line("ready:")
    assert http_get(srv.port).status == 200
    srv.stop()


def _socket_activation_command(srv, names="web"):
    # The shell's pid becomes squalld's (exec), so LISTEN_PID=$$ names squalld.
    script = (f'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES={names}; '
              'exec "$0" "$@"')
    return ["sh", "-c", script] + srv.command()


def test_socket_activation_serves_the_passed_socket_and_ignores_listen(daemons):
    unused = free_port()
    notify = daemons.notify_socket()
    # Passed sockets count as public: without tokens, the mail routes need anonymous = true.
    srv = daemons(config={"server": {"listen": [f"127.0.0.1:{unused}"]},
                          "auth": {"anonymous": True}})
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    port = listening.getsockname()[1]
    fd = listening.fileno()

    def at_fd_3():
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    try:
        srv.start(notify=notify, command=_socket_activation_command(srv), pass_fds=(3,),
                  preexec_fn=at_fd_3)
        assert f"127.0.0.1:{port}" in srv.ready.get("STATUS", ""), srv.ready
        srv.wait_for_line(f'listening on 127.0.0.1:{port} (socket "web" from systemd, '
                          'descriptor 3)')
        assert srv.bound() == [("127.0.0.1", port)]
        assert http_get(port).status == 200
        assert is_refused(unused), "the configured address was opened too"
        # A reload keeps the inherited socket, whatever [server] listen says.
        srv.write_config({"server": {"listen": [f"127.0.0.1:{free_port()}"]},
                          "auth": {"anonymous": True}})
        srv.reload()
        assert http_get(port).status == 200
        srv.stop()
        # systemd keeps its copy of the socket: squalld never shut it down.
        probe = socket.create_connection(("127.0.0.1", port), timeout=2)
        probe.close()
    finally:
        listening.close()


def test_socket_activation_without_tokens_is_refused(daemons):
    """systemd's sockets may be on any address (squalld.socket: port 80 everywhere), so they
    are treated as public: no open mail relay without tokens or anonymous = true."""
    srv = daemons(allow_errors=True)
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    fd = listening.fileno()

    def at_fd_3():
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    try:
        srv.start(command=_socket_activation_command(srv), pass_fds=(3,), preexec_fn=at_fd_3)
        assert srv.wait_exit() == 1
        srv.wait_for_line("squalld serves sockets passed by systemd (socket activation), and "
                          "[auth] tokens_file names no token")
    finally:
        listening.close()


def test_socket_activation_refuses_a_socket_that_is_not_listening(daemons):
    srv = daemons(allow_errors=True)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    fd = udp.fileno()

    def at_fd_3():
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    try:
        srv.start(command=_socket_activation_command(srv), pass_fds=(3,), preexec_fn=at_fd_3)
        assert srv.wait_exit() == 1
        srv.wait_for_line("descriptor 3 (\"web\") passed by systemd is not a listening stream "
                          "socket")
    finally:
        udp.close()


def test_journal_lines_have_priority_prefixes_and_no_timestamps(daemons):
    notify = daemons.notify_socket()
    srv = daemons(allow_errors=True).start(notify=notify, journal=True)
    line, _ = srv.wait_for_line("listening on")
    assert re.fullmatch(r"<6>listening on 127\.0\.0\.1:\d+", line), line
    # A warning and an error, through a reload: <4> and <3>.
    srv.write_config({"server": {"thread_pool_size": 6}})
    srv.reload()
    line, _ = srv.wait_for_line("thread_pool_size changed")
    assert line.startswith("<4>reload: [server] thread_pool_size changed"), line
    srv.write_config(text="[limits]\nmax_body_bytes = 12\n[nope]\n")
    srv.reload()
    line, _ = srv.wait_for_line("reload refused")
    assert line.startswith("<3>reload refused"), line
    with srv._cond:
        lines = list(srv.lines)
    assert all(re.match(r"<[0-7]>", l) for l in lines), lines
    assert not any(re.search(r"\d{4}-\d\d-\d\dT\d\d:", l) for l in lines), lines
    srv.stop()


def test_journal_stream_of_another_file_keeps_the_plain_format(daemons):
    srv = daemons().start(env={"JOURNAL_STREAM": "1:1"})
    line, _ = srv.wait_for_line("listening on")
    assert re.match(r"\[\d{4}-\d\d-\d\dT[^]]+\] \[info\] listening on", line), line
    srv.stop()


def test_daemon_flag_is_ignored_under_systemd(daemons, tmp_path):
    notify = daemons.notify_socket()
    pid_file = tmp_path / "squalld.pid"
    srv = daemons(args=["--daemon", "--pid-file", str(pid_file)])
    srv.start(notify=notify)
    # READY came from the process we started: it did not fork away.
    assert srv.ready.pid == srv.pid
    assert srv.proc.poll() is None
    assert pid_file.read_text() == f"{srv.pid}\n"
    srv.wait_for_line("--daemon is ignored, staying in the foreground")
    srv.stop()
    assert not pid_file.exists()


# ---------------------------------------------------------------------------------------------
# The unit files


def _units(tmp_path):
    return render_units(tmp_path / "units", squalld_path())


@pytest.mark.skipif(systemd_analyze() is None, reason="systemd-analyze is not installed "
                    "(Debian package systemd)")
def test_systemd_analyze_verify(tmp_path):
    units = _units(tmp_path)
    # Documentation=man:squalld(8) is checked too: point man at the page in docs/.
    man = tmp_path / "man" / "man8"
    man.mkdir(parents=True)
    (man / "squalld.8").write_bytes((REPO / "docs" / "squalld.8").read_bytes())
    env = dict(os.environ, MANPATH=str(tmp_path / "man"))
    # Without man(1) (a minimal system), that one check is left out.
    man_check = [] if shutil.which("man") else ["--man=no"]
    result = subprocess.run([systemd_analyze(), "verify", *man_check, *map(str, units)],
                            capture_output=True, text=True, timeout=60, env=env,
                            cwd=tmp_path / "units")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.skipif(systemd_analyze() is None, reason="systemd-analyze is not installed "
                    "(Debian package systemd)")
def test_systemd_analyze_security_is_ok_or_better(tmp_path):
    service = _units(tmp_path)[0]
    result = subprocess.run([systemd_analyze(), "security", "--offline=yes", "--no-pager",
                             str(service)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    m = re.search(r"Overall exposure level for squalld\.service: (\d+\.\d+) (\w+)",
                  result.stdout)
    assert m, result.stdout[-2000:]
    exposure, rating = float(m.group(1)), m.group(2)
    # README.md records the score (1.2 OK with systemd 252).
    assert rating in ("OK", "SAFE", "PERFECT"), (exposure, rating, result.stdout[-3000:])


def test_make_install_and_uninstall(tmp_path):
    dest = tmp_path / "dest"
    binary = squalld_path()
    # -o: install the binary under test as it is, never rebuild it here.
    make = ["make", "-s", "--no-print-directory", "-o", binary, f"SQUALLD={binary}",
            "PREFIX=/usr", f"DESTDIR={dest}"]
    result = subprocess.run(make + ["install"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.access(dest / "usr/bin/squalld", os.X_OK)
    assert (dest / "usr/share/man/man8/squalld.8").read_bytes() == \
        (REPO / "docs/squalld.8").read_bytes()
    service = (dest / "usr/lib/systemd/system/squalld.service").read_text()
    assert "ExecStart=/usr/bin/squalld --config /etc/squall/squalld.toml\n" in service
    assert (dest / "usr/lib/systemd/system/squalld.socket").exists()
    assert (dest / "etc/logrotate.d/squalld").read_text() == \
        (REPO / "config/logrotate").read_text()
    config = dest / "etc/squall/squalld.toml"
    assert config.read_text() == (REPO / "config/squalld.toml").read_text()

    # An edited config survives a second install and the uninstall.
    config.write_text(config.read_text() + "# edited\n")
    result = subprocess.run(make + ["install"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and config.read_text().endswith("# edited\n"), result.stdout
    result = subprocess.run(make + ["uninstall"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    left = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert left == ["etc/squall/squalld.toml"], left

    # The shipped config, unedited, goes too.
    subprocess.run(make + ["install"], cwd=REPO, check=True, capture_output=True, timeout=120)
    config.write_text((REPO / "config/squalld.toml").read_text())
    subprocess.run(make + ["uninstall"], cwd=REPO, check=True, capture_output=True, timeout=120)
    assert not [p for p in dest.rglob("*") if p.is_file()]

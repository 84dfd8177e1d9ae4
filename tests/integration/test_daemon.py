"""squalld as a classic daemon: --daemon and --pid-file, a refused second instance, a failed
start that the caller sees, relative paths after chdir /, and [server] user."""

import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from squall_helpers import REPO, render_toml, squalld_path
from systemd_helpers import (ExitWatcher, clean_environment, daemons, free_port,  # noqa: F401
                             http_get, pid_alive, proc_stat)


def write_config(directory, **tables):
    config = {
        "server": {"listen": ["127.0.0.1:0"]},
        "log": {"level": "info", "error_log": "error.log", "access_log": "off"},
        "timeouts": {"drain": "5s"},
    }
    for table, keys in tables.items():
        config.setdefault(table, {}).update(keys)
    (directory / "squalld.toml").write_text(render_toml(config))


def run_daemon(directory, *extra, timeout=10):
    """Starts `squalld --daemon` from `directory` with relative paths; returns the finished
    starting process."""
    return subprocess.run([squalld_path(), "--daemon", "--pid-file", "squalld.pid", "--config",
                           "squalld.toml", "--port-file", "port", *extra],
                          cwd=directory, env=clean_environment(), capture_output=True,
                          text=True, timeout=timeout)


class Running:
    """A started daemon: its pid from the pid file, killed at the end if still there."""

    def __init__(self, directory):
        self.directory = directory
        self.pid = int((directory / "squalld.pid").read_text())
        self.watcher = ExitWatcher(self.pid)

    @property
    def port(self):
        return int((self.directory / "port").read_text().split()[0].rpartition(":")[2])

    def terminate(self, timeout=10):
        os.kill(self.pid, signal.SIGTERM)
        assert self.watcher.wait(timeout), "the daemon did not exit after SIGTERM"

    def cleanup(self):
        if pid_alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
            self.watcher.wait(5)
        self.watcher.close()


@pytest.fixture
def workdir(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    return directory


def test_daemon_writes_its_pid_file_serves_and_cleans_up(workdir):
    write_config(workdir)
    result = run_daemon(workdir)
    # The starting process returns only once the daemon listens and the pid file exists.
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    text = (workdir / "squalld.pid").read_text()
    assert text.endswith("\n") and text.strip().isdigit(), text
    daemon = Running(workdir)
    try:
        assert pid_alive(daemon.pid)
        assert http_get(daemon.port).status == 200
        # Detached: not a session leader, in a session other than ours, cwd /, stdio on
        # /dev/null, umask 027.
        state, ppid, pgrp, session = proc_stat(daemon.pid)[:4]
        assert int(session) != daemon.pid and int(session) != os.getsid(0)
        assert os.readlink(f"/proc/{daemon.pid}/cwd") == "/"
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{daemon.pid}/fd/{fd}") == "/dev/null"
        status = open(f"/proc/{daemon.pid}/status").read()
        assert "Umask:\t0027" in status, status
        # Relative paths were taken from the starting directory, not from /.
        assert "listening on" in (workdir / "error.log").read_text()
        # SIGHUP reloads the same (relative) config file.
        write_config(workdir, routes={"plaintext": False})
        os.kill(daemon.pid, signal.SIGHUP)
        switched_off = False
        for _ in range(250):  # bounded: up to 5 s
            if http_get(daemon.port).status == 404:
                switched_off = True
                break
            daemon.watcher.wait(0.02)
        assert switched_off, (workdir / "error.log").read_text()

        daemon.terminate()
        assert not (workdir / "squalld.pid").exists()
        log = (workdir / "error.log").read_text()
        assert "drained: exiting" in log and "stopped" in log, log
    finally:
        daemon.cleanup()


def test_second_instance_is_refused_while_the_first_runs(workdir, tmp_path):
    write_config(workdir)
    assert run_daemon(workdir).returncode == 0
    daemon = Running(workdir)
    try:
        # Same pid file, another config and port: refused with the pid and the path.
        second = run_daemon(workdir)
        assert second.returncode == 1
        expected = (f"squalld is already running as pid {daemon.pid} "
                    f"(pid file {workdir / 'squalld.pid'})")
        assert expected in second.stderr, second.stderr
        # Also in the foreground.
        foreground = subprocess.run([squalld_path(), "--pid-file", str(workdir / "squalld.pid"),
                                     "--listen", "127.0.0.1:0"], env=clean_environment(),
                                    capture_output=True, text=True, timeout=10)
        assert foreground.returncode == 1 and expected in foreground.stderr, foreground.stderr
        # The first one is untouched.
        assert (workdir / "squalld.pid").read_text() == f"{daemon.pid}\n"
        assert http_get(daemon.port).status == 200
        daemon.terminate()
        assert not (workdir / "squalld.pid").exists()
    finally:
        daemon.cleanup()


def test_stale_pid_file_is_taken_over(workdir):
    write_config(workdir)
    (workdir / "squalld.pid").write_text("999999\n")
    assert run_daemon(workdir).returncode == 0
    daemon = Running(workdir)
    try:
        assert daemon.pid != 999999
        daemon.terminate()
    finally:
        daemon.cleanup()


def test_failed_start_is_visible_to_the_caller(workdir):
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        write_config(workdir, server={"listen": [f"127.0.0.1:{port}"]})
        result = run_daemon(workdir)
        assert result.returncode == 1
        assert f"127.0.0.1:{port}" in result.stderr, result.stderr
        assert "address already in use" in result.stderr, result.stderr
        assert not (workdir / "squalld.pid").exists()
    finally:
        busy.close()


def test_invalid_config_fails_before_daemonizing(workdir):
    (workdir / "squalld.toml").write_text("[server]\nbacklog = \"x\"\n")
    result = run_daemon(workdir)
    assert result.returncode == 1
    assert "squalld.toml:2: [server] backlog" in result.stderr, result.stderr
    assert not (workdir / "squalld.pid").exists()


def test_pid_file_without_daemon(daemons, tmp_path):
    pid_file = tmp_path / "fg.pid"
    srv = daemons(args=["--pid-file", str(pid_file)])
    srv.start()
    srv.wait_for_line("ready:")
    assert pid_file.read_text() == f"{srv.pid}\n"
    assert http_get(srv.port).status == 200
    srv.stop()
    assert not pid_file.exists()


def test_unknown_user_is_refused(daemons):
    srv = daemons(config={"server": {"user": "no-such-squall-user"}}, allow_errors=True)
    srv.start()
    assert srv.wait_exit() == 1
    srv.wait_for_line('[server] user "no-such-squall-user": no such user')


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_user_is_switched_to_after_binding(daemons, tmp_path):
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    notify = daemons.notify_socket()
    # A privileged port proves the binding happened as root.
    port = None
    for candidate in range(900, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port = candidate
            break
    assert port is not None
    # The job store is opened after the switch, so it lives where nobody may write (pytest's
    # own temporary root is private to root).
    state = pathlib.Path(tempfile.mkdtemp(prefix="squall-state-"))
    os.chmod(state, 0o755)
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    srv = daemons(config={"server": {"user": "nobody", "listen": [f"127.0.0.1:{port}"]},
                          "jobs": {"store": str(state / "jobs.db")}})
    srv.start(notify=notify)
    status = open(f"/proc/{srv.pid}/status").read()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
    assert uids == [str(nobody.pw_uid)] * 4, uids
    assert gids == [str(nobody.pw_gid)] * 4, gids
    srv.wait_for_line(f"switched to user nobody (uid {nobody.pw_uid})")
    assert http_get(port).status == 200
    srv.stop()
    shutil.rmtree(state)


def test_a_start_failing_after_the_user_switch_names_the_port_file_it_cannot_take_back(daemons):
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    # Root writes the port file on binding, into the test's directory (private to root); the job
    # store then fails to open as nobody, in a directory only root may write, and nobody cannot
    # remove the port file either: squalld says so, naming the file, and still exits 1.
    state = pathlib.Path(tempfile.mkdtemp(prefix="squall-state-"))
    os.chmod(state, 0o755)
    try:
        srv = daemons(config={"server": {"user": "nobody", "listen": ["127.0.0.1:0"]},
                              "jobs": {"store": str(state / "jobs.db")}}, allow_errors=True)
        srv.start()
        assert srv.wait_exit() == 1, srv.stderr_text()
        srv.wait_for_line(f"switched to user nobody (uid {nobody.pw_uid})")
        srv.wait_for_line(str(state / "jobs.db"))
        srv.wait_for_line(f"--port-file {srv.port_file}: cannot remove it after the failed start")
        assert srv.port_file.exists()
    finally:
        shutil.rmtree(state)


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed")
def test_logrotate_snippet_rotates_and_squalld_reopens(workdir, tmp_path):
    write_config(workdir)
    assert run_daemon(workdir).returncode == 0
    daemon = Running(workdir)
    try:
        # The shipped snippet, pointed at this daemon's log directory and pid file.
        snippet = (REPO / "config" / "logrotate").read_text()
        assert "/var/log/squall/*.log" in snippet and "/run/squalld.pid" in snippet
        conf = tmp_path / "logrotate.conf"
        conf.write_text(snippet.replace("/var/log/squall/*.log", f"{workdir}/*.log")
                        .replace("/run/squalld.pid", str(workdir / "squalld.pid")))
        conf.chmod(0o644)
        result = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert "listening on" in (workdir / "error.log.1").read_text()
        # The postrotate signal made squalld reopen error.log (a file: polled, bounded).
        log = workdir / "error.log"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if log.exists() and "SIGUSR1: log files reopened" in log.read_text():
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"squalld did not reopen error.log after the rotation: "
                                 f"{sorted(p.name for p in workdir.iterdir())} {result!r}")
        daemon.terminate()
        assert "stopped" in (workdir / "error.log").read_text()
    finally:
        daemon.cleanup()

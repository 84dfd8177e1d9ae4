"""SIGHUP reloads: under load nothing is dropped, new limits and routes apply, a broken config
is refused and the old one kept, the listen list is diffed, the log level changes."""

import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

from squall_helpers import Conn, Metrics, request
from systemd_helpers import daemons, free_port, http_get, is_refused  # noqa: F401


def post_echo(conn: Conn, size: int):
    conn.send(request("POST", "/echo", headers=[("Content-Type", "application/octet-stream")],
                      body=b"x" * size))
    return conn.read_response()


class Load:
    """Keep-alive clients on threads, each also reconnecting every few requests, until stop();
    every answer must be a 200 with the right body."""

    def __init__(self, port, clients=4, body_size=200):
        self.port = port
        self.body_size = body_size
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.done = 0
        self.errors = []
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True)
                        for i in range(clients)]
        for t in self.threads:
            t.start()

    def run(self, index):
        n = 0
        conn = None
        try:
            while not self.stop_event.is_set():
                if conn is None or n % 25 == 0:
                    if conn is not None:
                        conn.close()
                    conn = Conn(self.port, timeout=5)
                if n % 2:
                    response = post_echo(conn, self.body_size)
                    ok = response.status == 200 and response.body == b"x" * self.body_size
                else:
                    conn.send(request("GET", "/plaintext"))
                    response = conn.read_response()
                    ok = response.status == 200 and response.body == b"Hello, World!"
                if not ok:
                    raise AssertionError(f"client {index}: {response!r}")
                n += 1
                with self.lock:
                    self.done += 1
        except Exception as e:  # noqa: BLE001 - reported by stop()
            with self.lock:
                self.errors.append(f"client {index} after {n} requests: {e!r}")
        finally:
            if conn is not None:
                conn.close()

    def count(self):
        with self.lock:
            return self.done

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(10)
        return self.done, self.errors


def test_reload_under_load_drops_nothing_and_applies_new_limits(daemons):
    notify = daemons.notify_socket()
    srv = daemons(config={"limits": {"max_body_bytes": "64KiB"}}).start(notify=notify)
    before = Conn(srv.port)  # a keep-alive connection from before every reload
    assert post_echo(before, 2048).status == 200
    load = Load(srv.port)
    try:
        for i in range(8):
            start = load.count()
            srv.write_config({"limits": {"max_body_bytes": f"{32 + i}KiB"},
                              "server": {"max_connections": 1000 + i},
                              "timeouts": {"keepalive": f"{60 + i}s"}})
            _, ready = srv.reload()
            assert "reloaded" in ready.get("STATUS", ""), ready
            # Requests keep flowing between reloads (bounded wait, not a fixed sleep).
            deadline = time.monotonic() + 5
            while load.count() < start + 20 and time.monotonic() < deadline and not load.errors:
                time.sleep(0.01)
        done, errors = load.stop()
    finally:
        load.stop()
    assert not errors, errors
    assert done >= 100, done

    # The new limit applies to new requests, on new and on old connections alike.
    srv.write_config({"limits": {"max_body_bytes": "1KiB"}})
    srv.reload()
    with Conn(srv.port) as c:
        assert post_echo(c, 2048).status == 413
    with Conn(srv.port) as c:
        assert post_echo(c, 1024).status == 200
    assert post_echo(before, 2048).status == 413
    before.close()
    srv.stop()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_reload_under_wrk_load(daemons):
    notify = daemons.notify_socket()
    srv = daemons().start(notify=notify)
    wrk = subprocess.Popen(["wrk", "-t1", "-c16", "-d3s", "--timeout", "2s",
                            f"http://127.0.0.1:{srv.port}/plaintext"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # wrk has connected once the server counts requests; then reload while it runs.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            metrics = Metrics(http_get(srv.port, "/metrics").body.decode())
            if metrics.total("squall_http_requests_total", route="/plaintext") > 100:
                break
            time.sleep(0.05)
        for i in range(5):
            srv.write_config({"server": {"max_connections": 2000 + i}})
            srv.reload()
            time.sleep(0.2)  # spread the reloads over wrk's run
        output, _ = wrk.communicate(timeout=20)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    assert wrk.returncode == 0, output
    assert "Socket errors" not in output, output
    assert "Non-2xx" not in output, output
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    assert requests > 500, output
    srv.stop()


def test_routes_switched_on_and_off_by_reload(daemons):
    notify = daemons.notify_socket()
    srv = daemons(config={"routes": {"plaintext": False}}).start(notify=notify)
    assert http_get(srv.port, "/plaintext").status == 404
    srv.write_config({"routes": {"plaintext": True, "echo": False}})
    srv.reload()
    assert http_get(srv.port, "/plaintext").status == 200
    with Conn(srv.port) as c:
        assert post_echo(c, 10).status == 404
    # The route switched on gets its own counters.
    metrics = Metrics(http_get(srv.port, "/metrics").body.decode())
    assert metrics.value("squall_http_requests_total", route="/plaintext", code="2xx") == 1
    assert metrics.value("squall_http_requests_total", route="none", code="4xx") == 2
    srv.stop()


BROKEN = [
    # (config text, what the error line must contain)
    ('[server]\nlisten = ["127.0.0.1:0"]\n[log]\nerror_log = "stderr"\naccess_log = "off"\n'
     '[limits]\nmax_body_bytes = "lots"\n', "squalld.toml:7: [limits] max_body_bytes"),
    ('[server]\nlisten = ["127.0.0.1:0"]\nmax_connections = "many"\n',
     "squalld.toml:3: [server] max_connections"),
    ('[server]\nlisten = ["127.0.0.1:0"]\n[log]\nlevel = "loud"\n', "squalld.toml:4: [log] level"),
    ('[server]\nlisten = ["127.0.0.1:0"]\n[limits\n', "squalld.toml:3"),
]


@pytest.mark.parametrize("text,expected", BROKEN, ids=["size", "type", "level", "syntax"])
def test_broken_config_on_reload_keeps_the_old_one(daemons, text, expected):
    notify = daemons.notify_socket()
    srv = daemons(config={"limits": {"max_body_bytes": "4KiB"}}, allow_errors=True)
    srv.start(notify=notify)
    mark = srv.line_count()
    srv.write_config(text=text)
    _, ready = srv.reload()
    assert ready.get("STATUS", "").startswith("Reload failed"), ready
    line, _ = srv.wait_for_line("reload refused", start=mark)
    assert expected in line, line
    # Still the old limits and routes.
    with Conn(srv.port) as c:
        assert post_echo(c, 3000).status == 200
    assert http_get(srv.port).status == 200
    # A good config afterwards applies.
    srv.write_config({"limits": {"max_body_bytes": "1KiB"}})
    srv.reload()
    with Conn(srv.port) as c:
        assert post_echo(c, 3000).status == 413
    srv.stop()


def test_changed_listen_list_opens_new_and_closes_removed(daemons):
    notify = daemons.notify_socket()
    srv = daemons().start(notify=notify)
    old = srv.port
    kept = Conn(old)  # accepted on the listener that goes away
    kept.send(request("GET", "/plaintext"))
    assert kept.read_response().status == 200
    new = free_port()
    srv.write_config({"server": {"listen": ["127.0.0.1:0", f"127.0.0.1:{new}"]}})
    srv.reload()
    srv.wait_for_line(f"listening on 127.0.0.1:{new}")
    assert http_get(old).status == 200
    assert http_get(new).status == 200
    assert f"127.0.0.1:{new}" in notify.snapshot()[-1].get("STATUS", "")

    srv.write_config({"server": {"listen": [f"127.0.0.1:{new}"]}})
    srv.reload()
    srv.wait_for_line(f"stopped listening on 127.0.0.1:{old}")
    assert is_refused(old)
    assert http_get(new).status == 200
    # The connection accepted on the closed listener is still served.
    kept.send(request("GET", "/plaintext"))
    assert kept.read_response().status == 200
    kept.close()
    srv.stop()


def test_listen_failure_refuses_the_reload_and_rolls_back(daemons):
    notify = daemons.notify_socket()
    srv = daemons(allow_errors=True).start(notify=notify)
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    busy_port = busy.getsockname()[1]
    extra = free_port()
    try:
        mark = srv.line_count()
        srv.write_config({"server": {"listen": ["127.0.0.1:0", f"127.0.0.1:{extra}",
                                                f"127.0.0.1:{busy_port}"],
                                     "max_connections": 5},
                          "limits": {"max_body_bytes": "1KiB"}})
        _, ready = srv.reload()
        assert ready.get("STATUS", "").startswith("Reload failed"), ready
        line, _ = srv.wait_for_line("reload refused", start=mark)
        assert "[server] listen" in line and f"127.0.0.1:{busy_port}" in line, line
        # The listener opened for this reload was closed again; nothing else changed.
        assert is_refused(extra)
        assert http_get(srv.port).status == 200
        with Conn(srv.port) as c:
            assert post_echo(c, 2048).status == 200
    finally:
        busy.close()
    srv.stop()


def test_log_level_changes_and_restart_only_keys_are_named(daemons):
    notify = daemons.notify_socket()
    srv = daemons().start(notify=notify)
    mark = srv.line_count()
    srv.write_config({"log": {"level": "warn"}, "server": {"thread_pool_size": 8}})
    srv.reload()
    _, index = srv.wait_for_line("[server] thread_pool_size changed; the new value takes effect "
                                 "at the next restart", start=mark)
    with srv._cond:
        info_lines = [l for l in srv.lines[mark:index] if "configuration reloaded" in l]
    # Logged before the warning, at info: hidden by the new level.
    assert info_lines == [], info_lines

    mark = srv.line_count()
    srv.write_config({"log": {"level": "info"}, "server": {"thread_pool_size": 8}})
    srv.reload()
    srv.wait_for_line("configuration reloaded", start=mark)
    srv.stop()


def test_listen_override_is_kept_across_reloads(daemons):
    unused = free_port()
    notify = daemons.notify_socket()
    srv = daemons(config={"server": {"listen": [f"127.0.0.1:{unused}"]}},
                  args=["--listen", "127.0.0.1:0"])
    srv.start(notify=notify)
    port = srv.port
    srv.reload()
    assert is_refused(unused)
    assert http_get(port).status == 200
    srv.stop()


def test_sighup_while_draining_is_ignored(daemons):
    notify = daemons.notify_socket()
    srv = daemons(config={"timeouts": {"drain": "5s", "body": "5s"}}).start(notify=notify)
    busy = Conn(srv.port)
    busy.send(request("POST", "/echo", content_length=10) + b"0123")
    assert http_get(srv.port).status == 200  # the server has read the partial request
    start = len(notify)
    import signal
    srv.signal(signal.SIGTERM)
    notify.wait_for("STOPPING", "1", start=start)
    srv.signal(signal.SIGHUP)
    srv.wait_for_line("SIGHUP while draining: not reloading")
    busy.send(b"456789")
    assert busy.read_response().status == 200
    busy.close()
    assert srv.wait_exit() == 0
    assert not [n for n in notify.snapshot()[start:] if "RELOADING" in n]
    srv.stop()

"""[server] workers = 2: two event loops, each with its own SO_REUSEPORT socket (or a share of
systemd's), serving everything one loop serves: connections spread over both, the job routes
and one /metrics for the whole process, SIGTERM drains both, SIGHUP reaches both without
dropping a keep-alive connection, max_connections stays server-wide, a stuck worker stops the
watchdog pings, and bad values are config errors naming file, line and key."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from squall_helpers import (Conn, Metrics, open_many, parse_responses, request, squalld_path,
                            wait_refused)
from systemd_helpers import daemons, free_port, http_get  # noqa: F401

JSON = ("Content-Type", "application/json")
CID_RE = re.compile(r"cid=(\d+)")


def workers_config(tmp_path, **tables) -> dict:
    config = {
        "server": {"workers": 2},
        "jobs": {"store": str(tmp_path / "jobs.db")},
        "smtp": {"url": f"maildir:{tmp_path / 'mail'}"},
    }
    for table, keys in tables.items():
        config.setdefault(table, {}).update(keys)
    return config


def fresh_request(port, method, target, headers=(), body=b""):
    """One request on a new connection (the kernel picks the worker), then close."""
    with Conn(port, timeout=5) as conn:
        conn.send(request(method, target, headers=[*headers, ("Connection", "close")],
                          body=body))
        return conn.read_response()


def metrics(port) -> Metrics:
    response = fresh_request(port, "GET", "/metrics")
    assert response.status == 200, response
    return Metrics(response.body.decode())


def workers_of(access_log, route) -> set[int]:
    """Which workers answered `route`, from the access log: worker i of 2 numbers its
    connections i + 1, i + 3, ..."""
    seen = set()
    for line in access_log.read_text().splitlines():
        if f" {route} " in line:
            seen.add((int(CID_RE.search(line).group(1)) - 1) % 2)
    return seen


def wait_access_lines(access_log, route, count, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        lines = [l for l in access_log.read_text().splitlines() if f" {route} " in l]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_connections_spread_over_both_workers_and_metrics_sum(squalld, tmp_path):
    srv = squalld(config=workers_config(tmp_path))
    srv.wait_for_line(f"listening on 127.0.0.1:{srv.port}")
    srv.wait_for_line("2 workers accept on each address, a socket each (SO_REUSEPORT)")
    srv.wait_for_line("1 listener(s), 2 worker(s)")
    for _ in range(40):
        assert fresh_request(srv.port, "GET", "/plaintext").body == b"Hello, World!"
    m = metrics(srv.port)
    per_worker = [m.value("squall_worker_connections_accepted_total", worker=i) for i in (0, 1)]
    # SO_REUSEPORT hashes each connection to one of the two sockets: both get some.
    assert all(count > 0 for count in per_worker), per_worker
    assert sum(per_worker) == m.value("squall_connections_accepted_total") >= 40
    # One /metrics for the process: the request counts of both loops, summed.
    assert m.value("squall_http_requests_total", route="/plaintext", code="2xx") == 40
    requests = [m.value("squall_worker_requests_total", worker=i) for i in (0, 1)]
    assert sum(requests) == 40 and all(r > 0 for r in requests), requests
    lines = wait_access_lines(srv.access_log, "/plaintext", 40)
    assert len(lines) == 40
    assert workers_of(srv.access_log, "/plaintext") == {0, 1}
    # Connection ids stay unique across workers.
    ids = [int(CID_RE.search(line).group(1)) for line in lines]
    assert len(set(ids)) == 40


def test_email_and_job_status_work_whatever_worker_answers(squalld, tmp_path):
    srv = squalld(config=workers_config(tmp_path))
    ids = []
    for n in range(16):
        body = ('{"to": "ann@example.com", "subject": "s%d", "text": "t"}' % n).encode()
        response = fresh_request(srv.port, "POST", "/email", headers=[JSON], body=body)
        assert response.status == 202, response
        ids.append(response.json()["id"])
        assert response.get("location") == f"/jobs/{ids[-1]}"
    assert workers_of(srv.access_log, "/email") == {0, 1}
    # The status of every job, asked on new connections (either worker), until all are sent.
    deadline = time.monotonic() + 10
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        for job_id in list(pending):
            response = fresh_request(srv.port, "GET", f"/jobs/{job_id}")
            assert response.status == 200, response
            if response.json()["status"] == "sent":
                pending.discard(job_id)
    assert not pending
    assert len(list((tmp_path / "mail" / "new").iterdir())) == 16
    # One queue and one idempotency table: a key repeated on any worker finds the same job.
    body = b'{"to": "bob@example.com", "subject": "once", "text": "t"}'
    key = ("Idempotency-Key", "order-7")
    answers = [fresh_request(srv.port, "POST", "/email", headers=[JSON, key], body=body)
               for _ in range(8)]
    assert [a.status for a in answers] == [202] + [200] * 7
    assert len({a.json()["id"] for a in answers}) == 1
    # Errors computed on the primary loop come back with their headers.
    response = fresh_request(srv.port, "POST", "/email", headers=[("Content-Type", "text/plain")],
                             body=b"x")
    assert response.status == 415 and response.json()["field"] == "Content-Type"
    assert fresh_request(srv.port, "GET", "/jobs/0123").status == 404


def test_rates_are_global_across_workers(squalld, tmp_path):
    srv = squalld(config=workers_config(tmp_path, quota={"address_per_minute": 1,
                                                         "address_burst": 4}))
    statuses = []
    for n in range(10):
        body = ('{"to": "ann@example.com", "subject": "r%d", "text": "t"}' % n).encode()
        statuses.append(fresh_request(srv.port, "POST", "/email", headers=[JSON],
                                      body=body).status)
    # One bucket for the address, whichever loop took the connection.
    assert statuses == [202] * 4 + [429] * 6, statuses


def test_max_connections_is_server_wide(squalld, tmp_path):
    srv = squalld(config=workers_config(tmp_path, server={"max_connections": 2}))
    conns = []
    statuses = []
    try:
        for _ in range(8):
            conn = Conn(srv.port, timeout=5)
            conns.append(conn)
            conn.send(request("GET", "/plaintext"))
            statuses.append(conn.read_response().status)
    finally:
        for conn in conns:
            conn.close()
    # Per worker, each of the two loops would have let two in.
    assert statuses.count(200) == 2 and statuses.count(503) == 6, statuses


def test_sigterm_drains_in_flight_requests_on_both_workers(squalld, tmp_path):
    srv = squalld(config=workers_config(tmp_path))
    conns = []
    body = b"0123456789"
    for _ in range(12):
        conn = Conn(srv.port, timeout=10)
        conn.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: 10\r\n\r\n" + body[:4])
        conns.append(conn)
    # Every connection has been accepted and is in the middle of its body.
    deadline = time.monotonic() + 5
    while metrics(srv.port).value("squall_connections_open") < 13:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    mark = srv.line_count()
    srv.signal(signal.SIGTERM)
    # The total may count the metrics request's connection too, if its close is not read yet;
    # what matters is that each worker has begun its drain before the bodies complete.
    line, _ = srv.wait_for_line(re.compile(r"SIGTERM: draining (\d+) connections"), start=mark)
    assert re.search(r"draining (12|13) connections", line), line
    srv.wait_for_line("worker 0: draining", start=mark)
    srv.wait_for_line("worker 1: draining", start=mark)
    for conn in conns:
        conn.send(body[4:])
        response = conn.read_response()
        assert response.status == 200 and response.body == body
        assert "close" in response.connection_tokens()
        conn.close()
    assert srv.wait_exit() == 0
    assert workers_of(srv.access_log, "/echo") == {0, 1}


def read_to_close(sock, timeout=10.0) -> tuple[bytes, bool]:
    """Everything the server sends until it closes, and whether it reset the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return data, True
    return data, False


def connect_many(port, count, send_now):
    """`count` connections to `port` (the kernel completes them whether or not a worker
    accepts); every other one has sent its request already when `send_now`."""
    socks = open_many("127.0.0.1", port, count)
    for sock in socks:
        sock.setblocking(True)
    if send_now:
        for sock in socks[::2]:
            sock.sendall(request("GET", "/plaintext", headers=[("Connection", "close")]))
    return socks


def expect_one_answer_each(socks, sent_already):
    """Sends the request on the connections not in `sent_already`, then reads each to its close:
    one whole 200 each, which says Connection: close, and no reset."""
    for sock in socks:
        if sock not in sent_already:
            sock.sendall(request("GET", "/plaintext", headers=[("Connection", "close")]))
    for i, sock in enumerate(socks):
        data, reset = read_to_close(sock)
        assert not reset, f"connection {i} of {len(socks)} reset after {data!r}"
        responses, rest = parse_responses(data)
        assert len(responses) == 1 and not rest, (i, data)
        assert responses[0].status == 200 and responses[0].body == b"Hello, World!"
        assert "close" in responses[0].connection_tokens(), responses[0]


def test_sigterm_answers_every_connection_the_kernel_completed(squalld, tmp_path):
    """A worker closing its SO_REUSEPORT socket makes the kernel reset the connections still
    in its accept queue, although their clients saw the handshake complete. Each worker accepts
    its queue empty first, worker 0 (which gets every new connection from the SIGTERM on)
    closes last, and a connection whose first request has not arrived yet gets it answered with
    Connection: close. Worker 1 is held stopped meanwhile (as a busy loop would be), so that
    connections wait in its queue: some from before the SIGTERM, some from after it."""
    srv = squalld(config=workers_config(tmp_path, timeouts={"drain": "10s"}))
    srv.wait_for_line("worker(s), pid")  # every worker runs
    (tid,) = thread_ids(srv.proc.pid, "squall-worker1")
    socks = []
    try:
        with Frozen(tid):
            before = connect_many(srv.port, 32, send_now=True)
            socks += before
            mark = srv.line_count()
            srv.signal(signal.SIGTERM)
            srv.wait_for_line("SIGTERM: draining", start=mark)
            socks += connect_many(srv.port, 32, send_now=False)
        expect_one_answer_each(socks, sent_already=before[::2])
    finally:
        for sock in socks:
            sock.close()
    assert wait_refused("127.0.0.1", srv.port), "still accepting after the drain"
    assert srv.wait_exit() == 0, srv.stderr_text()
    assert workers_of(srv.access_log, "/plaintext") == {0, 1}


def test_sighup_removing_an_address_answers_every_connection_queued_on_it(squalld, tmp_path):
    """The same when a reload removes an address: what its sockets queue is served, then
    connecting there is refused. Worker 1 is held stopped while the reload runs, and
    connections arrive once worker 0 has applied it (the port file no longer lists the
    address)."""
    port = free_port()
    config = workers_config(tmp_path, server={"listen": ["127.0.0.1:0", f"127.0.0.1:{port}"]})
    srv = squalld(config=config, listeners=2)
    srv.write_config({**config, "server": {**config["server"], "listen": ["127.0.0.1:0"]}})
    srv.wait_for_line("worker(s), pid")  # every worker runs
    (tid,) = thread_ids(srv.proc.pid, "squall-worker1")
    socks = []
    mark = srv.line_count()
    try:
        with Frozen(tid):
            srv.signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while f":{port}" in srv.port_file.read_text():
                assert time.monotonic() < deadline, "the reload did not rewrite the port file"
                time.sleep(0.01)
            socks += connect_many(port, 32, send_now=True)
        expect_one_answer_each(socks, sent_already=socks[::2])
    finally:
        for sock in socks:
            sock.close()
    srv.wait_for_line(f"stopped listening on 127.0.0.1:{port}", start=mark)
    srv.wait_for_line("configuration reloaded", start=mark)
    assert wait_refused("127.0.0.1", port), f"127.0.0.1:{port} still accepting"
    assert fresh_request(srv.port, "GET", "/plaintext").status == 200


def test_sighup_reload_reaches_both_workers_and_drops_no_keepalive_connection(squalld,
                                                                              tmp_path):
    config = workers_config(tmp_path)
    srv = squalld(config=config)
    conns = [Conn(srv.port, timeout=5) for _ in range(12)]
    for conn in conns:
        conn.send(request("GET", "/plaintext"))
        response = conn.read_response()
        assert response.status == 200 and response.get("server") == "squall"
    m = metrics(srv.port)
    assert all(m.value("squall_worker_requests_total", worker=i) > 0 for i in (0, 1))
    mark = srv.line_count()
    srv.write_config({**config, "server": {**config["server"], "name": "reloaded"},
                      "routes": {"echo": False}})
    srv.signal(signal.SIGHUP)
    srv.wait_for_line("configuration reloaded", start=mark)
    # The same keep-alive connections, on both loops, see the new settings.
    for conn in conns:
        conn.send(request("GET", "/plaintext"))
        response = conn.read_response()
        assert response.status == 200 and response.get("server") == "reloaded"
        conn.send(request("POST", "/echo", body=b"x"))
        assert conn.read_response().status == 404
        conn.close()
    statuses = {fresh_request(srv.port, "POST", "/echo", body=b"x").status for _ in range(10)}
    assert statuses == {404}


def test_sighup_opens_added_addresses_on_both_workers(squalld, tmp_path):
    config = workers_config(tmp_path)
    srv = squalld(config=config)
    port = free_port()
    mark = srv.line_count()
    srv.write_config({**config, "server": {**config["server"],
                                           "listen": ["127.0.0.1:0", f"127.0.0.1:{port}"]}})
    srv.signal(signal.SIGHUP)
    srv.wait_for_line(f"listening on 127.0.0.1:{port}", start=mark)
    srv.wait_for_line("configuration reloaded", start=mark)
    for _ in range(30):
        assert fresh_request(port, "GET", "/plaintext").status == 200
    lines = [l for l in srv.access_log.read_text().splitlines() if "/plaintext" in l]
    assert workers_of(srv.access_log, "/plaintext") == {0, 1}, lines


def test_a_second_squalld_on_the_same_port_is_refused(squalld, tmp_path):
    port = free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = squalld(config=workers_config(tmp_path / "a",
                                          server={"listen": [f"127.0.0.1:{port}"]}))
    second = squalld(config=workers_config(tmp_path / "b",
                                           server={"listen": [f"127.0.0.1:{port}"]}),
                     start=False, allow_errors=True)
    second.start(listeners=0)
    assert second.wait_exit() == 1
    second.wait_for_line(f"cannot bind 127.0.0.1:{port}: Address already in use")
    assert http_get(first.port).status == 200


def test_socket_activation_shares_the_passed_socket_among_workers(daemons, tmp_path):
    srv = daemons(config=workers_config(tmp_path, auth={"anonymous": True}))
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(64)
    port = listening.getsockname()[1]
    fd = listening.fileno()

    def at_fd_3():
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    script = 'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web; exec "$0" "$@"'
    notify = daemons.notify_socket()
    try:
        srv.start(notify=notify, command=["sh", "-c", script] + srv.command(), pass_fds=(3,),
                  preexec_fn=at_fd_3)
        srv.wait_for_line(f'listening on 127.0.0.1:{port} (socket "web" from systemd, '
                          'descriptor 3)')
        srv.wait_for_line("2 workers accept from each socket from systemd")
        # One socket, two loops polling it: whichever wakes first takes a connection, so the
        # split is up to the scheduler. Each loop, alone, takes them all.
        for tid in (srv.pid, *thread_ids(srv.pid, "squall-worker1")):
            with Frozen(tid):
                for _ in range(5):
                    with Conn(port, timeout=5) as conn:
                        conn.send(request("GET", "/plaintext", headers=[("Connection", "close")]))
                        assert conn.read_response().status == 200
        m = metrics(port)
        per_worker = [m.value("squall_worker_connections_accepted_total", worker=i)
                      for i in (0, 1)]
        assert all(count >= 5 for count in per_worker), per_worker
        srv.stop()
    finally:
        listening.close()


class Frozen:
    """Stops one thread of another process (ptrace's group-stop of one task), as a loop stuck in
    a handler would be, and lets it go on exit. The other threads run on."""

    PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_DETACH = 0x4206, 0x4207, 17

    def __init__(self, tid):
        self.tid = tid
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                     ctypes.c_void_p]

    def __enter__(self):
        if self.libc.ptrace(self.PTRACE_SEIZE, self.tid, None, None) != 0:
            pytest.skip(f"ptrace is not permitted here: {os.strerror(ctypes.get_errno())}")
        assert self.libc.ptrace(self.PTRACE_INTERRUPT, self.tid, None, None) == 0
        os.waitpid(self.tid, 0x40000000)  # __WALL: the tracee is a thread of another process
        return self

    def __exit__(self, *exc):
        self.libc.ptrace(self.PTRACE_DETACH, self.tid, None, None)


def thread_ids(pid, name) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/comm") as comm:
            if comm.read().strip() == name:
                found.append(int(task))
    return found


def test_a_stuck_worker_stops_the_watchdog_pings(daemons, tmp_path):
    notify = daemons.notify_socket()
    srv = daemons(config=workers_config(tmp_path))
    srv.start(notify=notify, env={"WATCHDOG_USEC": "400000"})
    srv.wait_for_line("systemd watchdog: pinging every 200 ms")
    index, _ = notify.wait_for("WATCHDOG", "1", timeout=2, start=srv.ready_index)
    (tid,) = thread_ids(srv.pid, "squall-worker1")
    # Worker 1 stuck (as in an endless handler): worker 0's loop, which sends the pings, runs;
    # the connections the kernel hashes to worker 1's socket wait, which is why it must restart.
    with Frozen(tid):
        stopped = time.monotonic()
        time.sleep(1.2)  # what is checked is an absence: it takes waiting
        resumed = time.monotonic()
        pings = [n for n in notify.snapshot()
                 if "WATCHDOG" in n and stopped + 0.5 < n.received < resumed]
        assert not pings, pings
    _, late = notify.wait_for("WATCHDOG", "1", timeout=2, start=len(notify))
    assert late.received >= resumed
    srv.stop()


@pytest.mark.parametrize("value, shown", [
    ("0", "integer 0"),
    ("-1", "integer -1"),
    ("1.5", "float 1.5"),
    ('"two"', '"two"'),
    ("257", "integer 257"),
])
def test_bad_worker_counts_are_config_errors_naming_file_line_and_key(tmp_path, value, shown):
    path = tmp_path / "squalld.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\n\nworkers = {value}\n')
    for args in (["--check-config"], []):
        result = subprocess.run([squalld_path(), "--config", str(path), *args],
                                capture_output=True, text=True, timeout=10)
        assert result.returncode == 1
        assert (f'{path}:4: [server] workers: expected an integer from 1 to 256 or "auto", '
                f"got {shown}") in result.stderr, result.stderr


def test_auto_is_one_worker_per_usable_core(squalld, tmp_path):
    srv = squalld(config=workers_config(tmp_path, server={"workers": "auto"}))
    cores = len(os.sched_getaffinity(0))
    srv.wait_for_line(f"1 listener(s), {cores} worker(s)")
    assert http_get(srv.port).status == 200

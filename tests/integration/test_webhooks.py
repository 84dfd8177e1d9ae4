"""Job webhooks ([webhooks]), black-box: a real local HTTP receiver (http.server on port 0 in a
thread) that checks each Squall-Signature with the secret, as README "Webhooks" tells a
receiver to. Mail goes through the Maildir transport."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import signal
import subprocess
import threading
import time
from pathlib import Path

from squall_helpers import Metrics, squalld_path
from test_maildir import job_state, maildir_config, post

SECRET = "whsec-test-0123456789"


def verify(secret: str, header: str, body: bytes, tolerance: int = 300) -> bool:
    """The receiver's check from README "Webhooks"."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    t, v1 = parts["t"], parts["v1"]
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, v1) and abs(time.time() - int(t)) <= tolerance


class Receiver:
    """Answers each POST with the next status of `statuses` (then 200), and keeps every
    request whose signature verified; a request with a bad signature fails the test."""

    def __init__(self, statuses=(), port=0, hang=False):
        self.statuses = list(statuses)
        self.release = threading.Event()  # hang=True: answers wait for it
        self.requests: list[dict] = []
        self.bad: list[str] = []
        self.cond = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.cond:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    if not verify(SECRET, self.headers.get("Squall-Signature", ""), body):
                        receiver.bad.append(self.headers.get("Squall-Signature", ""))
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers),
                                              "body": json.loads(body), "status": status})
                    receiver.cond.notify_all()
                if hang:
                    receiver.release.wait(30)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/squall"

    def wait(self, count: int, timeout=20.0) -> list[dict]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.requests) >= count, timeout), \
                self.requests
            assert not self.bad, self.bad
            return list(self.requests)

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def metrics(srv) -> Metrics:
    response = srv.get("/metrics")
    assert response.status == 200, response
    return Metrics(response.body.decode())


def wait_metric(srv, name, value, timeout=10.0) -> Metrics:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(srv)
        if m.value(name, default=-1) == value:
            return m
        assert time.monotonic() < deadline, f"{name} != {value}: {m.value(name, default=-1)}"
        time.sleep(0.05)


def secret_file(tmp_path: Path, mode=0o600) -> Path:
    path = tmp_path / "webhook.key"
    path.write_text(SECRET + "\r\n")
    path.chmod(mode)
    return path


def config(tmp_path: Path, url: str, **jobs) -> dict:
    base = maildir_config(tmp_path / "mail", tmp_path / "jobs.db", **jobs)
    base["webhooks"] = {"url": url, "secret_file": str(secret_file(tmp_path)),
                        "timeout": "2s", "max_attempts": 5}
    return base


def send_one(srv) -> str:
    response = post(srv, {"to": "ann@example.com", "subject": "s", "text": "t"})
    assert response.status == 202, response
    return response.json()["id"]


def test_a_sent_job_delivers_one_signed_webhook(squalld, tmp_path):
    receiver = Receiver()
    try:
        srv = squalld(config=config(tmp_path, receiver.url))
        job_id = send_one(srv)
        [hook] = receiver.wait(1)
        body = hook["body"]
        assert hook["path"] == "/hooks/squall"
        assert body["type"] == "job.sent" and body["id"] == job_id, body
        assert body["status"] == "sent" and body["attempts"] == 1 and body["finished_at"], body
        assert body["event_id"] == hook["headers"]["Squall-Event-Id"]
        assert hook["headers"]["Content-Type"] == "application/json"
        # A wrong secret does not verify: the check above is a real one.
        raw = json.dumps(body).encode()
        assert not verify("another secret", hook["headers"]["Squall-Signature"], raw)
        m = wait_metric(srv, "squall_webhooks_delivered_total", 1)
        assert m.value("squall_webhooks_attempts_total") == 1
        assert m.value("squall_webhooks_failed_total") == 0
        time.sleep(1.2)  # two more polls: a delivered webhook is not sent again
        assert len(receiver.requests) == 1
    finally:
        receiver.close()


def test_a_receiver_answering_500_twice_gets_three_attempts(squalld, tmp_path):
    receiver = Receiver(statuses=[500, 500])
    try:
        srv = squalld(config=config(tmp_path, receiver.url))
        send_one(srv)
        hooks = receiver.wait(3)
        assert [h["status"] for h in hooks] == [500, 500, 200]
        assert len({h["headers"]["Squall-Event-Id"] for h in hooks}) == 1  # one event, for dedup
        assert srv.wait_for_line("attempt 2 failed: the receiver answered HTTP 500")
        time.sleep(1.2)
        assert len(receiver.requests) == 3
        m = wait_metric(srv, "squall_webhooks_delivered_total", 1)
        assert m.value("squall_webhooks_attempts_total") == 3
        assert m.value("squall_webhooks_delivered_total") == 1
    finally:
        receiver.close()


def test_a_webhook_refused_max_attempts_times_is_given_up_and_counted(squalld, tmp_path):
    receiver = Receiver(statuses=[503] * 10)
    try:
        cfg = config(tmp_path, receiver.url)
        cfg["webhooks"]["max_attempts"] = 2
        srv = squalld(config=cfg, allow_errors=True)
        send_one(srv)
        receiver.wait(2)
        assert srv.wait_for_line("given up after 2 attempt", timeout=10)
        wait_metric(srv, "squall_webhooks_failed_total", 1)
        wait_metric(srv, "squall_webhooks_pending", 0)  # refreshed with each claim
        time.sleep(1.2)
        assert len(receiver.requests) == 2
    finally:
        receiver.close()


def test_a_job_failed_for_good_delivers_job_failed(squalld, tmp_path):
    receiver = Receiver()
    try:
        srv = squalld(config=config(tmp_path, receiver.url, max_attempts=1), allow_errors=True)
        srv.wait_for_line(" ready: ")
        maildir = tmp_path / "mail"
        (maildir / "tmp").rmdir()
        (maildir / "tmp").write_text("in the way")
        job_id = send_one(srv)
        [hook] = receiver.wait(1)
        body = hook["body"]
        assert body["type"] == "job.failed" and body["id"] == job_id, body
        assert body["status"] == "failed" and body["last_error"], body
        assert str(maildir) not in json.dumps(body)  # the sanitized error, as in GET /jobs/{id}
    finally:
        receiver.close()


def test_a_webhook_owed_at_kill_9_is_delivered_after_the_restart(squalld, tmp_path):
    down = Receiver()
    port = down.port
    down.close()  # nothing listens there now: deliveries fail
    cfg = config(tmp_path, f"http://127.0.0.1:{port}/hooks/squall")
    first = squalld(config=cfg, allow_errors=True)
    job_id = send_one(first)
    deadline = time.monotonic() + 10
    while job_state(first, job_id)["status"] != "sent":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert first.wait_for_line("attempt 1 failed", timeout=10)
    first.kill()

    receiver = Receiver(port=port)
    try:
        squalld(config=cfg)
        hooks = receiver.wait(1, timeout=30)
        assert hooks[0]["body"]["id"] == job_id and hooks[0]["body"]["type"] == "job.sent"
    finally:
        receiver.close()


def test_sigterm_cancels_a_delivery_in_flight_and_it_stays_owed(squalld, tmp_path):
    """The receiver takes the request and never answers: SIGTERM closes the client at once
    (no wait for [webhooks] timeout), and the next start delivers the webhook."""
    hanging = Receiver(hang=True)
    port = hanging.port
    cfg = config(tmp_path, f"http://127.0.0.1:{port}/hooks/squall")
    cfg["webhooks"]["timeout"] = "30s"
    try:
        first = squalld(config=cfg)
        job_id = send_one(first)
        hanging.wait(1)
        started = time.monotonic()
        first.signal(signal.SIGTERM)
        assert first.wait_exit(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert first.wait_for_line("delivery(ies) in flight cancelled; they stay owed")
    finally:
        hanging.close()

    receiver = Receiver(port=port)
    try:
        squalld(config=cfg)
        hooks = receiver.wait(1)
        assert hooks[0]["body"]["id"] == job_id
    finally:
        receiver.close()


def test_a_reload_that_changes_webhooks_says_it_takes_a_restart(squalld, tmp_path):
    receiver = Receiver()
    try:
        cfg = config(tmp_path, receiver.url)
        srv = squalld(config=cfg)
        mark = srv.line_count()
        cfg["webhooks"]["url"] = "https://hooks.example.com/other"
        srv.write_config(cfg)
        srv.signal(signal.SIGHUP)
        srv.wait_for_line("[webhooks] url changed; the new value takes effect at the next restart",
                          start=mark)
        send_one(srv)
        receiver.wait(1)  # still the URL it started with
    finally:
        receiver.close()


def run_with(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    config_path = tmp_path / "squalld.toml"
    config_path.write_text('[server]\nlisten = ["127.0.0.1:0"]\n'
                           f'[jobs]\nstore = "{tmp_path / "jobs.db"}"\n'
                           f'[smtp]\nurl = "maildir:{tmp_path / "mail"}"\n' + text)
    return subprocess.run([squalld_path(), "--config", str(config_path)], capture_output=True,
                          text=True, timeout=20)


def test_config_errors_name_the_key(tmp_path):
    result = run_with(tmp_path, '[webhooks]\nurl = "http://127.0.0.1:9/x"\n')
    assert result.returncode != 0
    assert "squalld.toml:8: [webhooks] url: webhooks need [webhooks] secret_file" in result.stderr

    result = run_with(tmp_path, '[webhooks]\nurl = "file:///etc/passwd"\nsecret_file = "k"\n')
    assert result.returncode != 0
    assert "squalld.toml:8: [webhooks] url: expected" in result.stderr, result.stderr

    key = secret_file(tmp_path, mode=0o640)
    result = run_with(tmp_path, f'[webhooks]\nurl = "http://127.0.0.1:9/x"\n'
                                f'secret_file = "{key}"\n')
    assert result.returncode != 0
    assert f"[webhooks] secret_file {key}: mode 0640" in result.stderr, result.stderr
    assert SECRET not in result.stderr

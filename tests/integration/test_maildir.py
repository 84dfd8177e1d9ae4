"""The Maildir transport ([smtp] url = "maildir:PATH"), black-box: the `make run` round trip of
README.md with config/dev.toml, kill -9 between accept and delivery, and no half-written file
ever visible in new/, also when the writer is killed in the middle of a message."""

from __future__ import annotations

import email
import email.policy
import json
import mailbox
import re
import shutil
import signal
import threading
import time
from pathlib import Path

from squall_helpers import curl, request

REPO = Path(__file__).resolve().parents[2]
JSON = ("Content-Type", "application/json")


def post(srv, body: dict, key: str | None = None):
    headers = [JSON] + ([("Idempotency-Key", key)] if key else [])
    with srv.conn(timeout=10) as c:
        c.send(request("POST", "/email", headers=headers, body=json.dumps(body).encode()))
        return c.read_response()


def job_state(srv, job_id) -> dict:
    response = srv.get(f"/jobs/{job_id}")
    assert response.status == 200, response
    return response.json()


def wait_sent(srv, job_ids, timeout=15.0):
    deadline = time.monotonic() + timeout
    pending = set(job_ids)
    while pending:
        pending = {j for j in pending if job_state(srv, j)["status"] != "sent"}
        if pending and time.monotonic() > deadline:
            raise AssertionError(f"not sent within {timeout} s: "
                                 f"{[job_state(srv, j) for j in sorted(pending)][:3]}")
        time.sleep(0.02)


def messages_in(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def message_id_of(content: bytes) -> str:
    m = re.search(rb"^Message-ID:\s*<([0-9a-f]{32})@", content, re.MULTILINE | re.IGNORECASE)
    assert m, content[:500]
    return m.group(1).decode()


def maildir_config(directory: Path, store: Path, **jobs) -> dict:
    """Quick retries, and a short lease (it must outlast [smtp] connect_timeout + timeout), so
    that the jobs a killed squalld had claimed are taken up soon after the restart."""
    return {
        "smtp": {"url": f"maildir:{directory}", "from": "Squall <noreply@example.com>",
                 "connect_timeout": "500ms", "timeout": "1s"},
        "jobs": {"store": str(store), "retry_initial": "100ms", "retry_max": "200ms",
                 "poll_interval": "50ms", "max_attempts": 100, "lease": "2s", **jobs},
    }


def test_make_run_config_delivers_the_readme_example_to_a_maildir(squalld):
    """config/dev.toml as `make run` uses it, started in a fresh directory: the README's curl
    line gets its 202, the job becomes sent, and the message is a file in squall-mail/new/
    next to the job store, readable by Python's own Maildir reader."""
    srv = squalld(start=False, args=["--listen", "127.0.0.1:0"])
    srv.write_config(text=(REPO / "config" / "dev.toml").read_text())
    srv.start()
    maildir = srv.workdir / "squall-mail"
    assert srv.wait_for_line("written to the Maildir " + str(maildir))

    body = json.dumps({"to": ["ann@example.com"], "subject": "Hello", "text": "Hi Ann"})
    answer = curl("-i", srv.url("/email"), "-H", "Content-Type: application/json",
                  "-H", "Idempotency-Key: order-1234", "-d", body)
    assert answer.returncode == 0, answer.stderr
    head, _, payload = answer.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 202 Accepted"), head
    job_id = json.loads(payload)["id"]
    assert f"\r\nLocation: /jobs/{job_id}" in head
    wait_sent(srv, [job_id])
    assert job_state(srv, job_id)["last_error"] is None
    assert (srv.workdir / "squall-jobs.db").exists()

    files = messages_in(maildir / "new")
    assert len(files) == 1, files
    (name, content), = files.items()
    assert re.fullmatch(rf"\d+\.{job_id}\..+", name), name
    assert list((maildir / "tmp").iterdir()) == []
    assert b"\r\n" in content  # the bytes a relay would get: CRLF lines
    parsed = email.message_from_bytes(content, policy=email.policy.default)
    assert parsed["To"] == "ann@example.com"
    assert parsed["Subject"] == "Hello"
    assert parsed["Message-ID"] == f"<{job_id}@localhost>"
    assert parsed.get_content().strip() == "Hi Ann"

    # The same Idempotency-Key is the same job: no second file.
    again = post(srv, {"to": ["ann@example.com"], "subject": "Hello", "text": "Hi Ann"},
                 key="order-1234")
    assert again.status == 200 and again.json()["id"] == job_id, again
    metrics = srv.metrics()
    assert metrics.value("squall_jobs_sent_total") == 1
    assert len(messages_in(maildir / "new")) == 1
    box = mailbox.Maildir(maildir, create=False)
    assert [m["Subject"] for m in box] == ["Hello"]


def test_a_maildir_that_fails_is_retried_and_kill_9_loses_nothing(squalld, tmp_path):
    """Writes fail (tmp/ is in the way, as on a broken disk): accepted jobs retry, naming the
    Maildir in last_error. squalld is killed with -9 between accept and delivery; after the
    Maildir is repaired and squalld restarted, each job is one complete file in new/."""
    maildir, store = tmp_path / "mail", tmp_path / "jobs.db"
    first = squalld(config=maildir_config(maildir, store), allow_errors=True)
    first.wait_for_line(" ready: ")  # the Maildir exists from here on
    (maildir / "tmp").rmdir()
    (maildir / "tmp").write_text("in the way")
    job_ids = []
    for i in range(10):
        response = post(first, {"to": f"r{i}@example.com", "subject": f"s{i}", "text": f"t{i}"})
        assert response.status == 202, response
        job_ids.append(response.json()["id"])
    deadline = time.monotonic() + 10
    while True:
        job = job_state(first, job_ids[0])
        if job["status"] == "retrying" and job["attempts"] >= 1:
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    # The public view has a summary; the error log names the Maildir and the reason.
    assert job["last_error"] == "delivery failed", job
    first.wait_for_line(re.compile(r"maildir .*: cannot create tmp/.*Not a directory"))
    first.signal(signal.SIGKILL)
    assert first.wait_exit(timeout=5) == -signal.SIGKILL
    assert list((maildir / "new").iterdir()) == []

    (maildir / "tmp").unlink()
    second = squalld(config=maildir_config(maildir, store))
    wait_sent(second, job_ids)
    files = messages_in(maildir / "new")
    assert sorted(message_id_of(c) for c in files.values()) == sorted(job_ids)
    assert list((maildir / "tmp").iterdir()) == []


def test_new_never_holds_a_half_written_message_even_across_kill_9(squalld, tmp_path):
    """Large messages, a reader polling new/ all along, and squalld killed while it writes:
    every file the reader ever saw in new/ is a complete message, and after a restart every
    accepted job is exactly one file."""
    maildir, store = tmp_path / "mail", tmp_path / "jobs.db"
    config = maildir_config(maildir, store, max_concurrent_sends=2)
    config["server"] = {"thread_pool_size": 4}
    first = squalld(config=config, allow_errors=True)
    text = {i: f"message {i}\n" + ("0123456789abcdef" * 48 + "\n") * 800 + f"end {i}\n"
            for i in range(24)}

    seen: dict[str, bytes] = {}
    stop = threading.Event()

    def watch_new():
        while not stop.is_set():
            for path in (maildir / "new").iterdir():
                if path.name not in seen:
                    try:
                        seen[path.name] = path.read_bytes()
                    except FileNotFoundError:
                        pass

    watcher = threading.Thread(target=watch_new, daemon=True)
    watcher.start()
    job_ids = []
    try:
        for i in range(24):
            response = post(first, {"to": f"r{i}@example.com", "subject": f"big {i}",
                                    "text": text[i]})
            assert response.status == 202, response
            job_ids.append(response.json()["id"])
            if i == 15:
                first.signal(signal.SIGKILL)  # in the middle of the writes
                break
        first.wait_exit(timeout=5)
        second = squalld(config=config)
        wait_sent(second, job_ids, timeout=30)
    finally:
        stop.set()
        watcher.join(5)

    final = messages_in(maildir / "new")
    assert sorted(message_id_of(c) for c in final.values()) == sorted(job_ids)
    for name, content in list(seen.items()) + list(final.items()):
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        number = int(parsed["Subject"].split()[1])
        assert parsed.get_content().replace("\r\n", "\n") == text[number], name
    assert list((maildir / "tmp").iterdir()) == []
    shutil.rmtree(maildir)

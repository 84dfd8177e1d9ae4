"""The job store, runner and SMTP side of exposing squalld, black-box against a real squalld and
the aiosmtpd harness: retention and private files, TLS to the relay, no duplicate sends when the
store hiccups or the process dies, store faults (503, /healthz), the password file, and a
shutdown bounded by [timeouts] drain even with a send stalled in DATA."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import ssl
import stat
import subprocess
import time
from collections import Counter

import pytest

from squall_helpers import squalld_path
from test_email_jobs import (  # noqa: F401  (smtp is a fixture)
    JSON,
    accept,
    get_job,
    jobs_config,
    message_id,
    message_id_of,
    post_email,
    simple,
    smtp,
    wait_job,
    wait_messages,
)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def read_only(store) -> sqlite3.Connection:
    """A read-only connection to squalld's store (WAL lets it read while squalld writes)."""
    return sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)


class StoreLocker:
    """Holds the store's write lock from another connection, as a backup tool would."""

    def __init__(self, store):
        self.db = sqlite3.connect(str(store), timeout=10, isolation_level=None)

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, *exc):
        self.db.execute("COMMIT")
        self.db.close()


# --------------------------------------------------------------------------------------------
# Retention and private files


def test_store_and_log_files_are_private_whatever_the_umask(smtp, squalld, tmp_path):
    server = smtp("accept")
    store = tmp_path / "jobs.db"
    config = jobs_config(store, server.url)
    old = os.umask(0)  # inherited by squalld
    try:
        srv = squalld(config=config)
    finally:
        os.umask(old)
    job = accept(srv, simple("private"))
    wait_job(srv, job, "sent")
    assert mode_of(store) == 0o600
    assert mode_of(f"{store}-wal") == 0o600
    assert mode_of(f"{store}-shm") == 0o600
    assert mode_of(f"{store}.lock") == 0o600
    assert mode_of(srv.access_log) == 0o640


def test_the_store_wal_is_checkpointed_by_its_checkpoint_thread(smtp, squalld, tmp_path):
    server = smtp("accept")
    store = tmp_path / "jobs.db"
    srv = squalld(config=jobs_config(store, server.url))
    # About 6 MiB of payloads: the WAL passes 1,000 pages (4 MiB) uncopied, which wakes the
    # store's checkpoint thread; the commits themselves never reach the 4,000-page bound.
    text = "x" * 200_000 + "\n"
    jobs = [accept(srv, simple(f"wal-{i}", text=text)) for i in range(30)]
    deadline = time.monotonic() + 20
    while srv.metrics().value("squall_jobs_store_checkpoints_total") < 1:
        assert time.monotonic() < deadline, "the checkpoint thread never ran"
        time.sleep(0.1)
    metrics = srv.metrics()
    assert metrics.value("squall_jobs_store_checkpoint_pages_total") >= 1000
    assert metrics.value("squall_jobs_store_commit_checkpoints_over_bound_total") == 0
    assert metrics.value("squall_jobs_store_checkpoint_failures_total") == 0
    for name in ("squall_jobs_store_commit_checkpoints_total",
                 "squall_jobs_store_commit_checkpoint_pages_total",
                 "squall_jobs_store_wal_restarts_total"):
        assert metrics.value(name) >= 0
    wait_job(srv, jobs[-1], "sent")


def test_a_sent_payload_is_deleted_and_finished_jobs_are_purged_after_retain(
        smtp, squalld, tmp_path):
    server = smtp("accept")
    store = tmp_path / "jobs.db"
    srv = squalld(config=jobs_config(store, server.url, jobs={"retain": "2s"}))
    body = simple("retained", bcc=["hidden@example.com"])
    key = ("Idempotency-Key", "retain-1")
    response = post_email(srv, body, headers=(JSON, key))
    assert response.status == 202, response
    job_id = response.json()["id"]
    wait_messages(server, [job_id])
    wait_job(srv, job_id, "sent")
    with read_only(store) as db:
        payload, digest = db.execute(
            "SELECT payload, payload_digest FROM jobs WHERE id = ?", (job_id,)).fetchone()
        assert payload == b"" or payload == "", payload  # no address, no text left
        assert len(digest) == 32
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    # The key still answers with the same job while it is kept: the digest compares.
    repeat = post_email(srv, body, headers=(JSON, key))
    assert repeat.status == 200, repeat
    assert repeat.json()["id"] == job_id
    other = post_email(srv, simple("other"), headers=(JSON, key))
    assert other.status == 422, other

    # After [jobs] retain (2 s; purged every second) the job and its key are gone.
    deadline = time.monotonic() + 10
    while srv.get(f"/jobs/{job_id}").status != 404:
        assert time.monotonic() < deadline, "the finished job was not purged"
        time.sleep(0.1)
    assert srv.metrics().value("squall_jobs_purged_total") >= 1
    again = post_email(srv, body, headers=(JSON, key))
    assert again.status == 202, again
    assert again.json()["id"] != job_id


# --------------------------------------------------------------------------------------------
# The store's file: foreign or newer files are refused untouched


@pytest.mark.parametrize("setup, message", [
    ("CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('ann');",
     "the file belongs to another program (it has tables users"),
    (f"PRAGMA application_id={0x5371616c}; PRAGMA user_version=99; CREATE TABLE jobs (x);",
     "schema version 99 is newer than this squall supports"),
])
def test_a_foreign_or_newer_store_is_refused_before_anything_is_written(tmp_path, setup,
                                                                        message):
    store = tmp_path / "other.db"
    db = sqlite3.connect(str(store))
    db.executescript(setup)
    db.close()
    before = store.read_bytes()
    config = tmp_path / "squalld.toml"
    config.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\n[jobs]\nstore = "{store}"\n')
    port_file = tmp_path / "port"
    result = subprocess.run(
        [squalld_path(), "--config", str(config), "--port-file", str(port_file)],
        capture_output=True, text=True, timeout=20)
    assert result.returncode == 1, result
    # A squalld that exits at start-up takes back the port file it wrote on binding, so a
    # script waiting for it does not connect to a server on its way out.
    assert not port_file.exists(), port_file.read_text()
    assert f"job store {store}: {message}" in result.stderr, result.stderr
    assert "nothing was written to it" in result.stderr
    assert store.read_bytes() == before  # not switched to WAL, not tagged, not migrated
    assert not os.path.exists(f"{store}-wal")


# --------------------------------------------------------------------------------------------
# Store faults: 503 with Retry-After, /healthz, recovery


def test_a_failing_store_gives_503_and_healthz_says_so_until_it_recovers(smtp, squalld,
                                                                        tmp_path):
    server = smtp("accept")
    store = tmp_path / "jobs.db"
    srv = squalld(config=jobs_config(store, server.url), allow_errors=True)
    health = srv.get("/healthz")
    assert health.status == 200 and health.json()["store"] == "ok", health
    with StoreLocker(store):
        # The store waits 5 s for the lock (busy_timeout), then gives up: nothing stored.
        response = post_email(srv, simple("locked"), timeout=20)
        assert response.status == 503, response
        assert response.get("Retry-After") == "5", response
        assert "nothing was stored" in response.json()["error"]
        health = srv.get("/healthz")
        assert health.status == 503, health
        assert health.json()["store"] == "failing", health
        assert health.json()["status"] == "failing", health
        assert srv.metrics().value("squall_jobs_store_failing") == 1
    srv.wait_for_line("the job store is failing")
    # Released: the probe (every second while failing) sees writes work again.
    deadline = time.monotonic() + 15
    while True:
        health = srv.get("/healthz", timeout=15)
        if health.status == 200:
            break
        assert time.monotonic() < deadline, health
        time.sleep(0.2)
    assert health.json() == {**health.json(), "status": "ok", "store": "ok"}
    assert srv.metrics().value("squall_jobs_store_failing") == 0
    job = accept(srv, simple("after"))
    wait_messages(server, [job])
    assert not any(b"subject locked" in m.content for m in server.messages)


# --------------------------------------------------------------------------------------------
# No duplicate sends


def test_a_sent_mark_delayed_by_a_locked_store_is_kept_and_never_sent_twice(smtp, squalld,
                                                                           tmp_path):
    """The relay says 250, then recording "sent" fails for 7 s (a backup holds the store) while
    the lease (4 s) runs out: the job is claimed again, and must not be sent again."""
    server = smtp("slow", delay=1.0)
    store = tmp_path / "jobs.db"
    config = jobs_config(store, server.url, jobs={"lease": "4s"},
                         smtp={"connect_timeout": "500ms", "timeout": "3s"})
    srv = squalld(config=config, allow_errors=True)
    job_id = accept(srv, simple("once"))
    server.wait_data_started(1)
    with StoreLocker(store):
        wait_messages(server, [job_id], timeout=5)  # the relay took it: 250
        srv.wait_for_line(f"recording the outcome of job {job_id} failed", timeout=10)
        # The scenario itself: the backup holds the lock 7 s in all (the failure above came
        # after the 5 s busy timeout); the 4 s lease ended meanwhile.
        time.sleep(7 - 5)
    job, _ = wait_job(srv, job_id, "sent", timeout=15)
    # Claims went on after the lock (a later job is sent): no second copy of the first.
    later = accept(srv, simple("later"))
    wait_messages(server, [later], timeout=10)
    copies = [m for m in server.messages if message_id_of(m.content) == message_id(job_id)]
    assert len(copies) == 1, [m.content[:200] for m in server.messages]
    assert len(server.data_started) == 2  # the job and the later one, each once


def test_after_kill_9_a_send_in_progress_is_reclaimed_at_once_not_after_its_lease(
        smtp, squalld, tmp_path):
    store = tmp_path / "jobs.db"
    stalled = smtp("slow", delay=60.0)
    config = jobs_config(store, stalled.url, jobs={"lease": "5m"})
    first = squalld(config=config, allow_errors=True)
    job_id = accept(first, simple("killed"))
    stalled.wait_data_started(1)
    first.signal(signal.SIGKILL)
    assert first.wait_exit(timeout=5) == -signal.SIGKILL

    working = smtp("accept")
    started = time.monotonic()
    second = squalld(config=jobs_config(store, working.url, jobs={"lease": "5m"}))
    second.wait_for_line("1 job(s) were being sent when the previous process stopped")
    found = wait_messages(working, [job_id], timeout=10)
    assert time.monotonic() - started < 10  # not the 5 minutes of the lease
    # The copy the killed process may have delivered carries the same Message-ID.
    assert found[job_id][0].parsed()["Message-ID"] == message_id(job_id)
    assert message_id_of(stalled.data_started[0]) == message_id(job_id)
    job, _ = wait_job(second, job_id, "sent")
    assert job["attempts"] == 2, job


def test_kill_9_before_the_end_of_data_then_a_restart_sends_each_job_once(smtp, squalld,
                                                                            tmp_path):
    """Exactly once across a kill -9 and a restart on one SQLite file, when the kill lands
    before the end of the message: the relay holds every DATA command before its 354, so the
    killed process's sends left nothing at the relay, and the next start sends each job once."""
    store = tmp_path / "jobs.db"
    relay = smtp("hold_data")
    config = jobs_config(store, relay.url, jobs={"lease": "5m", "max_concurrent_sends": 2})
    first = squalld(config=config, allow_errors=True)
    ids = [accept(first, simple(f"m{n}")) for n in range(10)]
    relay.wait_data_held(2)
    first.signal(signal.SIGKILL)
    assert first.wait_exit(timeout=5) == -signal.SIGKILL
    assert not relay.messages
    relay.release_data()

    second = squalld(config=config)
    second.wait_for_line("2 job(s) were being sent when the previous process stopped")
    wait_messages(relay, ids, timeout=20)
    for job_id in ids:
        wait_job(second, job_id, "sent")
    copies = Counter(message_id_of(m.content) for m in relay.messages)
    assert copies == Counter({message_id(j): 1 for j in ids}), copies


def test_kill_9_with_prefetched_jobs_loses_none_and_resends_only_in_the_250_window(
        smtp, squalld, tmp_path):
    """Jobs held ahead of their sends (the prefetch) show as waiting, in the store and in GET
    /jobs; kill -9 while sends finish and their outcomes are committed in groups: a restart
    takes every held and every sending job over at once (not after the 5 minute lease), no
    job is lost, and the only job sent twice is one whose 250 came before its "sent" was
    committed (the same Message-ID both times)."""
    store = tmp_path / "jobs.db"
    slow = smtp("slow", delay=0.15)
    config = jobs_config(store, slow.url, jobs={"lease": "5m", "max_concurrent_sends": 3},
                         server={"thread_pool_size": 5}, smtp={"connections": 3})
    first = squalld(config=config, allow_errors=True)
    ids = [accept(first, simple(f"kill-{i}")) for i in range(40)]

    deadline = time.monotonic() + 20
    while True:
        db = read_only(store)
        rows = db.execute("SELECT id, state, attempts, lease_until_ms FROM jobs").fetchall()
        db.close()
        held = [row[0] for row in rows if row[1] == "queued" and row[3] > 0]
        if len(held) >= 5 and len(slow.messages) >= 3:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.02)
    # Held, not sending: at most the three sends at once are.
    assert sum(1 for row in rows if row[1] == "sending") <= 3, rows
    assert all(row[2] == 0 for row in rows if row[0] in held), rows
    view = get_job(first, held[-1])
    assert (view["status"], view["attempts"]) == ("queued", 0), view

    first.signal(signal.SIGKILL)
    assert first.wait_exit(timeout=5) == -signal.SIGKILL
    db = read_only(store)
    state_at_kill = dict(db.execute("SELECT id, state FROM jobs").fetchall())
    db.close()
    assert any(state != "sent" for state in state_at_kill.values())

    working = smtp("accept")
    started = time.monotonic()
    second = squalld(config=jobs_config(store, working.url, jobs={"lease": "5m"}))
    for job_id in ids:
        wait_job(second, job_id, "sent", timeout=20)
    assert time.monotonic() - started < 20  # not the lease
    first_copies = Counter(message_id_of(m.content) for m in list(slow.messages))
    second_copies = Counter(message_id_of(m.content) for m in list(working.messages))
    for job_id in ids:
        mid = message_id(job_id)
        assert first_copies[mid] <= 1 and second_copies[mid] <= 1, job_id
        assert first_copies[mid] + second_copies[mid] >= 1, job_id  # none lost
        if state_at_kill[job_id] == "sent":
            assert second_copies[mid] == 0, job_id  # a committed "sent" is never sent again
        if first_copies[mid] and second_copies[mid]:
            # The window: the relay's 250 came, the "sent" was not committed yet.
            assert state_at_kill[job_id] in ("sending", "queued"), (job_id, state_at_kill[job_id])


# --------------------------------------------------------------------------------------------
# Shutdown bounded by [timeouts] drain


def test_sigterm_aborts_a_send_stalled_in_data_at_the_drain_deadline(smtp, squalld, tmp_path):
    store = tmp_path / "jobs.db"
    stalled = smtp("slow", delay=60.0)  # never answers the message within the test
    config = jobs_config(store, stalled.url, timeouts={"drain": "1s"})
    first = squalld(config=config)
    job_id = accept(first, simple("stalled"))
    stalled.wait_data_started(1)
    started = time.monotonic()
    first.signal(signal.SIGTERM)
    assert first.wait_exit(timeout=10) == 0, first.stderr_text()
    took = time.monotonic() - started
    # The drain deadline, plus at most the second libcurl takes to notice, not [smtp] timeout.
    assert took < 1 + 2.5, f"exit took {took:.1f} s"
    first.wait_for_line("drain deadline: aborting 1 send(s) in progress")
    first.wait_for_line(f"{job_id} attempt 1 aborted by shutdown")
    first.stop()  # no error lines

    with read_only(store) as db:
        state, attempts = db.execute("SELECT state, attempts FROM jobs WHERE id = ?",
                                     (job_id,)).fetchone()
    assert (state, attempts) == ("queued", 0)  # back in the queue, the attempt not counted
    working = smtp("accept")
    second = squalld(config=jobs_config(store, working.url))
    wait_messages(working, [job_id], timeout=10)
    job, _ = wait_job(second, job_id, "sent")
    assert job["attempts"] == 1, job


# --------------------------------------------------------------------------------------------
# TLS to the relay, the password file


@pytest.fixture(scope="module")
def relay_tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (made with openssl), its file, and a server-side
    SSLContext for the aiosmtpd harness."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is missing")
    base = tmp_path_factory.mktemp("relay-tls")
    cert, key = base / "relay.pem", base / "relay.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=relay.test", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return cert, context


PASSWORD = "relay-Pa55word"


def tls_config(store, url, password_file, **smtp_keys):
    config = jobs_config(store, url)
    config["smtp"].update({"starttls": "required", "username": "mailer",
                           "password_file": str(password_file), **smtp_keys})
    return config


def password_file(path, content=PASSWORD + "\r\n", mode=0o600):
    path.write_text(content, newline="")
    os.chmod(path, mode)
    return path


def test_starttls_verifies_the_relay_unless_its_ca_is_given(smtp, squalld, tmp_path,
                                                            relay_tls):
    cert, context = relay_tls
    relay = smtp("accept", auth=("mailer", PASSWORD), tls_context=context)
    secret = password_file(tmp_path / "password")  # ends in CR LF: both stripped

    # Verified against the system's CA store: the self-signed relay is refused, no AUTH.
    srv = squalld(config=tls_config(tmp_path / "a.db", relay.url, secret),
                  allow_errors=True)
    refused = accept(srv, simple("unverified"))
    job, _ = wait_job(srv, refused, "failed")
    # The public view names the kind of failure; the full text is in the error log only.
    assert job["last_error"] == "TLS with the relay failed", job
    srv.wait_for_line("TLS setup failed (")
    assert relay.auth_attempts == [] and relay.messages == []
    srv.stop(check_errors=False)

    # With its CA: encrypted, verified, logged in with the password (CR LF stripped).
    srv = squalld(config=tls_config(tmp_path / "b.db", relay.url, secret, ca_file=str(cert)),
                  )
    sent = accept(srv, simple("verified"))
    found = wait_messages(relay, [sent])
    assert found[sent][0].tls
    assert relay.auth_attempts and relay.auth_attempts[-1][1:] == ("mailer", True)
    wait_job(srv, sent, "sent")


def test_tls_verify_false_is_logged_loudly_at_start_and_reload(smtp, squalld, tmp_path,
                                                               relay_tls):
    _, context = relay_tls
    relay = smtp("accept", tls_context=context)
    config = jobs_config(tmp_path / "jobs.db", relay.url)
    config["smtp"].update({"starttls": "required", "tls_verify": False})
    srv = squalld(config=config)
    srv.wait_for_line(f"[smtp] tls_verify = false: the certificate of the relay {relay.url} is "
                      "NOT verified")
    job = accept(srv, simple("insecure"))
    assert wait_messages(relay, [job])[job][0].tls
    mark = srv.line_count()
    srv.signal(signal.SIGHUP)
    srv.wait_for_line("configuration reloaded", start=mark)
    srv.wait_for_line("tls_verify = false", start=mark)


def test_a_username_without_tls_is_a_config_error_naming_key_and_line(tmp_path):
    path = tmp_path / "clear.toml"
    path.write_text('[smtp]\nurl = "smtp://relay.example:587"\nusername = "mailer"\n'
                    'password_env = "P"\n')
    result = subprocess.run([squalld_path(), "--config", str(path), "--check-config"],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 1, result
    assert (f"{path}:3: [smtp] username: a username needs an encrypted connection, or the "
            "password goes in clear text") in result.stderr, result.stderr


def test_a_password_file_others_can_read_is_refused(tmp_path):
    secret = password_file(tmp_path / "password", mode=0o644)
    path = tmp_path / "squalld.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\n[smtp]\nurl = "smtps://127.0.0.1:1"\n'
                    f'username = "mailer"\npassword_file = "{secret}"\n'
                    f'[jobs]\nstore = "{tmp_path / "jobs.db"}"\n')
    result = subprocess.run([squalld_path(), "--config", str(path)], capture_output=True,
                            text=True, timeout=20)
    assert result.returncode == 1, result
    assert (f"[smtp] password_file {secret}: mode 0644 lets group or others read the password"
            in result.stderr), result.stderr


# --------------------------------------------------------------------------------------------
# Reload


def test_reload_checks_sends_against_the_running_pool(smtp, squalld, tmp_path):
    server = smtp("accept")
    config = jobs_config(tmp_path / "jobs.db", server.url)  # pool 4, 2 sends
    srv = squalld(config=config, allow_errors=True)
    bigger = jobs_config(tmp_path / "jobs.db", server.url, jobs={"max_concurrent_sends": 6})
    bigger["server"]["thread_pool_size"] = 8
    srv.write_config(bigger)
    mark = srv.line_count()
    srv.signal(signal.SIGHUP)
    line, _ = srv.wait_for_line("reload refused", start=mark)
    assert ("[jobs] max_concurrent_sends (6) must be below the running thread pool's size (4)"
            in line), line
    fits = jobs_config(tmp_path / "jobs.db", server.url, jobs={"max_concurrent_sends": 3})
    srv.write_config(fits)
    mark = srv.line_count()
    srv.signal(signal.SIGHUP)
    srv.wait_for_line("configuration reloaded", start=mark)
    job = accept(srv, simple("after-reload"))
    wait_messages(server, [job])

"""Background email jobs, black-box: POST /email and GET /jobs/{id} on a real squalld, sending
through the aiosmtpd harness (smtp_server.py). Each test asserts what an HTTP client and the SMTP
server see: the 202 and the job's life, the messages' headers and bodies, retries, kill -9 and
SIGTERM, validation, idempotency, back-pressure and metrics."""

from __future__ import annotations

import email.utils
import json
import os
import re
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone

import pytest

from smtp_server import SmtpServer, started_servers
from squall_helpers import Metrics, assert_plaintext_ok, request, squalld_path, wait_refused

SENDER_NAME = "Squall Test"
SENDER_ADDR = "noreply@example.com"
SENDER = f"{SENDER_NAME} <{SENDER_ADDR}>"
JOB_ID_RE = re.compile(r"[0-9a-f]{32}")
JSON = ("Content-Type", "application/json")


# --------------------------------------------------------------------------------------------
# Harness


class CapturingSmtpServer(SmtpServer):
    """SmtpServer that also records each message as DATA ends, before the slow mode's delay and
    before any failure reply: `data_started` shows a send that is in DATA right now (to kill
    squalld then) and the Message-ID an interrupted attempt carried. It hooks aiosmtpd's DATA
    handler through SMTP._handle_hooks (aiosmtpd 1.4)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_started: list[bytes] = []

    def _protocol(self):
        protocol = super()._protocol()
        inner = protocol._handle_hooks["DATA"]

        async def data(smtp, session, envelope):
            with self._cond:
                self.data_started.append(bytes(envelope.content))
                self._cond.notify_all()
            return await inner(smtp, session, envelope)

        protocol._handle_hooks["DATA"] = data
        return protocol

    def wait_data_started(self, count, timeout=5.0) -> list[bytes]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.data_started) >= count, timeout):
                raise AssertionError(f"{len(self.data_started)} of {count} DATA phases began "
                                     f"within {timeout} s")
            return list(self.data_started)


@pytest.fixture
def smtp():
    """A factory of started SMTP servers (CapturingSmtpServer), stopped at teardown."""
    yield from started_servers(CapturingSmtpServer)


def jobs_config(store, smtp_url, jobs=None, **tables) -> dict:
    """squalld's config for these tests: a job store in the test's directory, the harness's
    SMTP server without STARTTLS, short retries and polls, and a lease longer than the slowest
    send of these tests (the kill -9 test shortens it)."""
    config = {
        "server": {"thread_pool_size": 4},
        "smtp": {"url": smtp_url, "starttls": "off", "from": SENDER,
                 "connect_timeout": "2s", "timeout": "20s"},
        "jobs": {"store": str(store), "retry_initial": "100ms", "retry_max": "400ms",
                 "poll_interval": "50ms", "lease": "30s", "max_attempts": 3,
                 "max_concurrent_sends": 2},
    }
    config["jobs"].update(jobs or {})
    for table, keys in tables.items():
        config.setdefault(table, {}).update(keys)
    return config


def post_email(srv, body, headers=(JSON,), timeout=5.0):
    """POST /email on a fresh connection. body: a dict (sent as JSON), str or bytes."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    with srv.conn(timeout=timeout) as c:
        c.send(request("POST", "/email", headers=list(headers), body=body))
        return c.read_response()


def accept(srv, body, headers=(JSON,)) -> str:
    """POST /email that must be answered 202 as the spec says; returns the job id."""
    response = post_email(srv, body, headers)
    assert response.status == 202, response
    assert response.get("Content-Type", "").startswith("application/json"), response
    reply = response.json()
    assert set(reply) == {"id", "status"}, reply
    assert JOB_ID_RE.fullmatch(reply["id"]), reply
    assert reply["status"] == "queued", reply
    assert response.get("Location") == f"/jobs/{reply['id']}", response
    return reply["id"]


def get_job(srv, job_id) -> dict:
    response = srv.get(f"/jobs/{job_id}")
    assert response.status == 200, response
    assert response.get("Content-Type", "").startswith("application/json"), response
    job = response.json()
    assert job["id"] == job_id, job
    return job


def wait_job(srv, job_id, states, timeout=10.0, interval=0.02):
    """Polls GET /jobs/{id} (bounded) until its status is one of `states`. Returns the job and
    the distinct (status, attempts, last_error) observed on the way, in order."""
    if isinstance(states, str):
        states = (states,)
    history = []
    deadline = time.monotonic() + timeout
    while True:
        job = get_job(srv, job_id)
        seen = (job["status"], job["attempts"], job["last_error"])
        if not history or history[-1] != seen:
            history.append(seen)
        if job["status"] in states:
            return job, history
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not {states} within {timeout} s: {history}")
        time.sleep(interval)


def message_id(job_id) -> str:
    return f"<{job_id}@example.com>"


def message_id_of(content: bytes) -> str | None:
    m = re.search(rb"^Message-ID:\s*(\S+)\r?$", content, re.MULTILINE | re.IGNORECASE)
    return m.group(1).decode() if m else None


def wait_messages(server: SmtpServer, job_ids, timeout=10.0) -> dict:
    """Waits (on the server's arrivals, bounded) until a message with each job's Message-ID has
    arrived. Returns {job_id: [messages]}; every message must belong to one of job_ids."""
    wanted = {message_id(j): j for j in job_ids}
    deadline = time.monotonic() + timeout
    while True:
        messages = list(server.messages)
        found = {j: [] for j in job_ids}
        for m in messages:
            mid = message_id_of(m.content)
            if mid in wanted:
                found[wanted[mid]].append(m)
        if all(found.values()):
            return found
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = [j for j, ms in found.items() if not ms]
            raise AssertionError(f"no message for jobs {missing} within {timeout} s; got "
                                 f"{[message_id_of(m.content) for m in messages]}")
        try:
            server.wait_for(len(messages) + 1, timeout=remaining)
        except AssertionError:
            pass


def metrics(srv) -> Metrics:
    response = srv.get("/metrics")
    assert response.status == 200, response
    return Metrics(response.body.decode())


def simple(n="x", **extra) -> dict:
    return {"to": f"rcpt-{n}@example.com", "subject": f"subject {n}", "text": f"body {n}\n",
            **extra}


# --------------------------------------------------------------------------------------------
# One squalld and one accepting SMTP server for the quick tests of this module.


@pytest.fixture(scope="module")
def mail(module_job_store, module_squalld):
    """(squalld, smtp) sharing one store (SQLite, then PostgreSQL); tests tell their messages
    apart by Message-ID."""
    server = CapturingSmtpServer("accept").start()
    srv = module_squalld(config=jobs_config(module_job_store, server.url))
    yield srv, server
    srv.stop()
    server.stop()


@pytest.fixture(scope="module")
def strict(module_squalld, tmp_path_factory):
    """(squalld, smtp) for validation only: no valid email is posted to it but the sentinel
    of test_validation_sent_nothing, so any message there would come from a refused request."""
    server = CapturingSmtpServer("accept").start()
    store = tmp_path_factory.mktemp("strict") / "jobs.db"
    srv = module_squalld(config=jobs_config(store, server.url,
                                            jobs={"max_recipients": 5,
                                                  "max_email_bytes": "64KiB"}))
    yield srv, server
    srv.stop()
    server.stop()


def test_email_is_accepted_at_once_and_delivered(mail):
    srv, server = mail
    text = "Grüße ✓ plain part\nsecond line\n"
    html = "<p>Grüße ✓ <b>html</b> part</p>\n"
    subject = "Grüße aus Köln ✓ — squall"
    first = {
        "to": "Rcpt One <one@example.com>",  # a string
        "cc": ["cc@example.org"],
        "bcc": "hidden@example.net",
        "subject": subject,
        "text": text,
        "html": html,
    }
    second = {
        # Callers without a token may use [smtp] from's address only (see test_exposure.py for
        # tokens with their own senders); the display name is theirs.
        "from": "Other Sender <NoReply@Example.com>",
        "reply_to": "help@example.com",
        "to": ["two@example.com", "Two B <twob@example.com>"],  # a list
        "bcc": ["hidden2@example.net", "Hidden Three <hidden3@example.net>"],
        "subject": "plain ascii subject",
        "text": "only text",
    }
    started = time.monotonic()
    id1 = accept(srv, first)
    id2 = accept(srv, second)
    assert time.monotonic() - started < 1.0
    assert id1 != id2
    found = wait_messages(server, [id1, id2])
    [m1], [m2] = found[id1], found[id2]
    now = datetime.now(timezone.utc)

    # The first: default sender, To from a string, Cc, Bcc only in the envelope.
    assert m1.mail_from == SENDER_ADDR
    assert m1.rcpt_tos == ["one@example.com", "cc@example.org", "hidden@example.net"]
    assert all(byte < 0x80 for byte in m1.content), "the message is not 7-bit"
    assert b"hidden" not in m1.content.lower()
    msg = m1.parsed()
    assert [(a.display_name, a.addr_spec) for a in msg["From"].addresses] == [
        (SENDER_NAME, SENDER_ADDR)]
    assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses] == [
        ("Rcpt One", "one@example.com")]
    assert [a.addr_spec for a in msg["Cc"].addresses] == ["cc@example.org"]
    assert msg["Bcc"] is None
    assert str(msg["Subject"]) == subject
    assert msg["Message-ID"] == message_id(id1)
    assert id1 in msg["Message-ID"]
    sent_at = email.utils.parsedate_to_datetime(msg["Date"])
    assert abs((now - sent_at).total_seconds()) < 120, msg["Date"]
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert parts[0].get_content().replace("\r\n", "\n") == text
    assert parts[1].get_content().replace("\r\n", "\n") == html

    # The second: its own From (and envelope sender), To from a list, two Bcc, Reply-To.
    assert m2.mail_from == "NoReply@Example.com"
    assert m2.rcpt_tos == ["two@example.com", "twob@example.com", "hidden2@example.net",
                           "hidden3@example.net"]
    assert b"hidden" not in m2.content.lower()
    msg = m2.parsed()
    assert [(a.display_name, a.addr_spec) for a in msg["From"].addresses] == [
        ("Other Sender", "NoReply@Example.com")]
    assert [a.addr_spec for a in msg["To"].addresses] == ["two@example.com", "twob@example.com"]
    assert msg["Cc"] is None and msg["Bcc"] is None
    assert msg["Reply-To"].addresses[0].addr_spec == "help@example.com"
    assert str(msg["Subject"]) == "plain ascii subject"
    assert msg["Message-ID"] == message_id(id2)
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content() == "only text"

    for job_id in (id1, id2):
        job, _ = wait_job(srv, job_id, ("sent", "failed"), timeout=5)
        assert job["status"] == "sent", job
        assert job["attempts"] == 1, job
        assert job["last_error"] is None, job
        assert job["kind"] == "email"
        for key in ("created_at", "updated_at", "finished_at"):
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", job[key]), job


def test_threads_carry_names_for_operators(mail):
    """top -H, ps -L and perf name squalld's own threads: the store's commits and the SMTP
    connections' closer (started once a connection is kept after a send)."""
    srv, server = mail
    ident = accept(srv, {"to": "names@example.com", "subject": "names", "text": "t"})
    wait_messages(server, [ident])
    pid = srv.proc.pid
    names = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/comm") as comm:
            names.append(comm.read().strip())
    assert names.count("squall-store") == 1, names
    assert names.count("squall-smtp") == 1, names


def test_charset_parameter_is_accepted(mail):
    srv, server = mail
    job_id = accept(srv, simple("charset"),
                    headers=[("Content-Type", "application/json; charset=utf-8")])
    wait_messages(server, [job_id])


def test_media_type_is_case_insensitive(mail):
    # RFC 9110 8.3.1: type and subtype are case-insensitive.
    srv, server = mail
    job_id = accept(srv, simple("case"), headers=[("Content-Type", "Application/JSON")])
    wait_messages(server, [job_id])


def test_wrong_content_type_is_415(mail):
    srv, _ = mail
    response = post_email(srv, simple("415"), headers=[("Content-Type", "text/plain")])
    assert response.status == 415, response
    assert response.json()["field"] == "Content-Type", response


def test_idempotency_key(mail):
    srv, server = mail
    key = [("Idempotency-Key", "order-4711-confirmation"), JSON]
    body = simple("idem")
    first = post_email(srv, body, headers=key)
    assert first.status == 202, first
    job_id = first.json()["id"]
    assert first.get("Location") == f"/jobs/{job_id}"

    # The same request again: the same job, not a new one.
    again = post_email(srv, body, headers=key)
    assert again.status == 200, again
    assert again.json()["id"] == job_id, again
    assert again.get("Location") == f"/jobs/{job_id}", again
    # The same email spelled differently (key order, whitespace) is the same request.
    respelled = json.dumps(dict(reversed(list(body.items()))), indent=2)
    assert post_email(srv, respelled, headers=key).json()["id"] == job_id

    # The key reused for another email: refused, naming the header.
    other = post_email(srv, simple("idem-other"), headers=key)
    assert other.status == 422, other
    assert other.json()["field"] == "Idempotency-Key", other

    wait_job(srv, job_id, "sent", timeout=5)
    # After the send the key still answers with that job.
    late = post_email(srv, body, headers=key)
    assert late.status == 200 and late.json()["id"] == job_id, late
    assert late.json()["status"] == "sent", late

    # Exactly one message: a sentinel posted afterwards arrives, the job's message only once,
    # and nothing of the refused reuse.
    sentinel = accept(srv, simple("idem-sentinel"))
    wait_messages(server, [sentinel])
    ids = [message_id_of(m.content) for m in server.messages]
    assert ids.count(message_id(job_id)) == 1, ids
    assert not any(b"idem-other" in m.content for m in server.messages)


def test_idempotency_key_sent_concurrently(mail):
    """The same keyed request on several connections at once (likely one group commit): one
    job, one 202, the others 200 with its id, one message."""
    srv, server = mail
    body = json.dumps(simple("idem-race")).encode()
    data = request("POST", "/email", headers=[JSON, ("Idempotency-Key", "race-1")], body=body)
    conns = [srv.conn() for _ in range(6)]
    try:
        for c in conns:
            c.send(data)
        responses = [c.read_response() for c in conns]
    finally:
        for c in conns:
            c.close()
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] * 5 + [202], responses
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1, responses
    [job_id] = ids
    wait_job(srv, job_id, "sent", timeout=5)
    sentinel = accept(srv, simple("idem-race-sentinel"))
    wait_messages(server, [sentinel])
    assert [message_id_of(m.content) for m in server.messages].count(message_id(job_id)) == 1


def test_unknown_jobs_are_404(mail):
    srv, _ = mail
    for target in ("/jobs/" + "0123456789abcdef" * 2, "/jobs/abc", "/jobs/" + "f" * 32):
        response = srv.get(target)
        assert response.status == 404, (target, response)


def test_metrics(mail):
    srv, server = mail
    job_id = accept(srv, simple("metrics"))
    wait_job(srv, job_id, "sent", timeout=5)
    # squall_jobs{state=...} is refreshed every ~2 s: poll with a deadline.
    deadline = time.monotonic() + 6
    while True:
        m = metrics(srv)
        if m.value("squall_jobs", default=0, state="sent") >= 1:
            break
        assert time.monotonic() < deadline, m.text
        time.sleep(0.1)
    assert m.types.get("squall_jobs") == "gauge"
    for state in ("queued", "sending", "retrying", "failed"):
        assert m.find("squall_jobs", state=state), state
    assert m.types.get("squall_jobs_queue_depth") == "gauge"
    assert m.value("squall_jobs_queue_depth") >= 0
    assert m.types.get("squall_jobs_sent_total") == "counter"
    assert m.value("squall_jobs_sent_total") >= 1
    assert m.types.get("squall_jobs_retries_total") == "counter"
    assert m.value("squall_jobs_retries_total") == 0  # this SMTP server accepts everything
    assert m.types.get("squall_jobs_send_duration_seconds") == "histogram"
    assert m.value("squall_jobs_send_duration_seconds_bucket", le="+Inf") >= 1
    assert m.value("squall_jobs_send_duration_seconds_count") >= 1
    # Group commit: every accepted job was committed, and no commit without one.
    assert m.types.get("squall_jobs_store_inserts_total") == "counter"
    assert m.types.get("squall_jobs_store_insert_commits_total") == "counter"
    inserts = m.value("squall_jobs_store_inserts_total")
    assert 1 <= m.value("squall_jobs_store_insert_commits_total") <= inserts


# --------------------------------------------------------------------------------------------
# Validation: 400 naming the field, nothing stored, nothing sent.

BAD_REQUESTS = [
    ("invalid JSON", '{"to": "a@example.com", "subject": "x", "text": ', "body"),
    ("not an object", '["a@example.com"]', "body"),
    ("unknown field", {**simple("v"), "priority": "high"}, "priority"),
    ("duplicate key", '{"to": "a@example.com", "to": "b@example.com", "subject": "s", '
                      '"text": "t"}', "to"),
    ("missing to", {"subject": "s", "text": "t"}, "to"),
    ("empty to list", {"to": [], "subject": "s", "text": "t"}, "to"),
    ("missing content", {"to": "a@example.com", "subject": "s"}, "text"),
    ("malformed address", {**simple("v"), "to": "not-an-address"}, "to"),
    ("malformed address in a list",
     {**simple("v"), "to": ["ok@example.com", "bad@@example.com"]}, "to[1]"),
    ("malformed cc", {**simple("v"), "cc": ["a@exa_mple.com"]}, "cc[0]"),
    ("malformed from", {**simple("v"), "from": "nobody"}, "from"),
    ("CRLF in subject", {**simple("v"), "subject": "hi\r\nBcc: victim@example.com"}, "subject"),
    ("LF in subject", {**simple("v"), "subject": "hi\nX-Evil: 1"}, "subject"),
    ("CR in subject", {**simple("v"), "subject": "hi\rX-Evil: 1"}, "subject"),
    ("CRLF in to", {**simple("v"), "to": "a@example.com\r\nBcc: victim@example.com"}, "to"),
    ("LF in to list", {**simple("v"), "to": ["ok@example.com", "b@example.com\nCc: v@e.com"]},
     "to[1]"),
    ("CRLF in from", {**simple("v"), "from": "a@example.com\r\nBcc: victim@example.com"}, "from"),
    ("CRLF in a display name",
     {**simple("v"), "from": "Evil\r\nBcc: victim@example.com <a@example.com>"}, "from"),
    ("CRLF in reply_to", {**simple("v"), "reply_to": "a@example.com\r\nX: y"}, "reply_to"),
    ("too many recipients",
     {**simple("v"), "to": ["a@example.com", "b@example.com", "c@example.com"],
      "cc": ["d@example.com", "e@example.com"], "bcc": ["f@example.com"]}, "bcc[0]"),
    ("text over max_email_bytes", {**simple("v"), "text": "x" * (64 * 1024 + 1)}, "text"),
    ("wrong type", {**simple("v"), "subject": 42}, "subject"),
]


@pytest.mark.parametrize("case, body, field", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_400_naming_the_field(strict, case, body, field):
    srv, _ = strict
    response = post_email(srv, body)
    assert response.status == 400, response
    assert response.get("Content-Type", "").startswith("application/json"), response
    reply = response.json()
    assert reply.get("field") == field, reply
    assert isinstance(reply.get("error"), str) and reply["error"], reply
    assert not response.has("Location"), response


def test_bad_content_type_is_415(strict):
    srv, _ = strict
    response = post_email(srv, simple("v"), headers=[("Content-Type", "text/plain")])
    assert response.status == 415, response
    assert response.json()["field"] == "Content-Type", response


def test_validation_sent_nothing(strict):
    """Runs after the cases above: a valid sentinel arrives, and it is the only message the
    SMTP server ever saw (not even a RCPT for the refused requests)."""
    srv, server = strict
    for case, body, _ in BAD_REQUESTS:  # again, in case this test runs alone
        assert post_email(srv, body).status == 400, case
    assert post_email(srv, simple("v"), headers=[("Content-Type", "text/plain")]).status == 415
    sentinel = accept(srv, {"to": "sentinel@example.com", "subject": "sentinel", "text": "s"})
    wait_messages(server, [sentinel])
    assert [message_id_of(m.content) for m in server.messages] == [message_id(sentinel)]
    assert server.rcpt_attempts == ["sentinel@example.com"], server.rcpt_attempts
    job, _ = wait_job(srv, sentinel, "sent", timeout=5)
    m = metrics(srv)
    assert m.value("squall_jobs_queue_depth") == 0


# --------------------------------------------------------------------------------------------
# The send never blocks the loop


def test_slow_smtp_server_does_not_delay_the_answer(smtp, squalld, tmp_path):
    server = smtp("slow", delay=3.0)
    srv = squalld(config=jobs_config(tmp_path / "jobs.db", server.url))
    started = time.monotonic()
    first = accept(srv, simple("slow-1"))
    assert time.monotonic() - started < 0.5
    server.wait_data_started(1, timeout=3)  # the send is in DATA, waiting for the reply
    job, _ = wait_job(srv, first, ("sending", "sent", "failed"), timeout=2)
    assert job["status"] == "sending", job
    assert job["attempts"] == 1, job

    # While it waits: /healthz, /plaintext and another POST /email answer at once.
    for _ in range(3):
        started = time.monotonic()
        response = srv.get("/healthz")
        assert response.status == 200, response
        assert time.monotonic() - started < 0.5
    started = time.monotonic()
    second = accept(srv, simple("slow-2"))
    assert time.monotonic() - started < 0.5
    assert server.messages == [], "the slow server replied already: the test proves nothing"

    found = wait_messages(server, [first, second], timeout=8)
    assert len(found[first]) == 1 and len(found[second]) == 1
    for job_id in (first, second):
        job, history = wait_job(srv, job_id, ("sent", "failed"), timeout=3)
        assert job["status"] == "sent" and job["attempts"] == 1, history


# --------------------------------------------------------------------------------------------
# Failures: retries with backoff, then failed; permanent failures at once


def test_temporary_failures_retry_then_fail(job_store, smtp, squalld):
    server = smtp("tempfail")
    srv = squalld(config=jobs_config(job_store, server.url,
                                     jobs={"max_attempts": 3}))
    job_id = accept(srv, simple("tempfail"))
    job, history = wait_job(srv, job_id, "failed", timeout=10, interval=0.01)
    retrying = [(attempts, error) for status, attempts, error in history if status == "retrying"]
    assert retrying, f"never seen retrying: {history}"
    for attempts, error in retrying:
        assert 1 <= attempts < 3, history
        # The public view names the refusal, not the relay's text (which may quote addresses).
        assert error == "relay refused a recipient (451)", history
    attempts_seen = [attempts for _, attempts, _ in history]
    assert attempts_seen == sorted(attempts_seen), f"attempts went down: {history}"
    assert job["attempts"] == 3, job
    assert job["last_error"] == "gave up after 3 attempts: relay refused a recipient (451)", job
    # The whole text stays in the error log.
    assert "try again later" in srv.stderr_text()
    assert "finished_at" in job
    # Three attempts reached the SMTP server (one RCPT each), none was delivered.
    assert server.rcpt_attempts == ["rcpt-tempfail@example.com"] * 3, server.rcpt_attempts
    assert server.messages == []
    m = metrics(srv)
    assert m.value("squall_jobs_retries_total") == 2
    assert m.value("squall_jobs_sent_total") == 0


def test_permanent_failure_fails_at_once(job_store, smtp, squalld):
    server = smtp("permfail", fail_at="data")
    srv = squalld(config=jobs_config(job_store, server.url,
                                     jobs={"max_attempts": 5}))
    job_id = accept(srv, simple("permfail"))
    job, history = wait_job(srv, job_id, "failed", timeout=5, interval=0.01)
    assert job["attempts"] == 1, job
    assert job["last_error"] == "relay refused the message (550)", job
    assert "rejected for testing" in srv.stderr_text()
    assert not any(status == "retrying" for status, _, _ in history), history
    assert server.messages == []
    assert len(server.data_started) == 1  # one attempt, refused at the end of DATA
    assert message_id_of(server.data_started[0]) == message_id(job_id)


# --------------------------------------------------------------------------------------------
# Durability: kill -9 during sends, SIGTERM drain


def test_kill_9_during_sends_loses_no_accepted_job(job_store, smtp, squalld):
    store = job_store
    slow = smtp("slow", delay=30.0)
    # A short lease, so the restart need not wait long for the killed sends; it must still
    # outlast a whole send ([smtp] connect_timeout + timeout), which squalld checks.
    short_lease = {"lease": "5s"}
    short_smtp = {"connect_timeout": "500ms", "timeout": "4s"}
    config = jobs_config(store, slow.url, jobs=short_lease, smtp=short_smtp)
    first = squalld(config=config, allow_errors=True)
    job_ids = [accept(first, simple(f"kill-{i}")) for i in range(5)]

    # More POSTs keep arriving on a keep-alive connection while the process dies: every one
    # answered 202 must be delivered after the restart.
    late_ids: list[str] = []
    enough = threading.Event()
    ended: list[str] = []

    def keep_posting():
        try:
            with first.conn(timeout=5) as c:
                for i in range(2000):
                    c.send(request("POST", "/email", headers=[JSON],
                                   body=json.dumps(simple(f"late-{i}"))))
                    response = c.read_response()
                    assert response.status == 202, response
                    late_ids.append(response.json()["id"])
                    if len(late_ids) >= 20:
                        enough.set()
            ended.append("finished")
        except (OSError, ConnectionError, AssertionError) as e:
            ended.append(repr(e))  # the server died under us: late_ids has every 202

    poster = threading.Thread(target=keep_posting, daemon=True)
    poster.start()
    interrupted = slow.wait_data_started(2, timeout=5)  # two sends in DATA
    assert enough.wait(timeout=5), f"only {len(late_ids)} POSTs answered: {ended}"
    first.signal(signal.SIGKILL)
    assert first.wait_exit(timeout=5) == -signal.SIGKILL
    poster.join(timeout=10)
    assert not poster.is_alive()
    assert ended and ended[0] != "finished", "the POSTs ended before the kill"
    assert slow.messages == []  # no send completed before the kill

    interrupted_ids = [message_id_of(content) for content in interrupted]
    assert all(mid in {message_id(j) for j in job_ids + late_ids} for mid in interrupted_ids)

    working = smtp("accept")
    second = squalld(config=jobs_config(store, working.url, jobs=short_lease, smtp=short_smtp))
    everything = job_ids + late_ids
    # Interrupted sends hold a 5 s lease: they are sent again once it expires.
    found = wait_messages(working, everything, timeout=15)
    for job_id in everything:
        job, _ = wait_job(second, job_id, "sent", timeout=5)
        # At least once; every copy carries the job's Message-ID.
        for m in found[job_id]:
            assert m.parsed()["Message-ID"] == message_id(job_id)
        if message_id(job_id) in interrupted_ids:
            assert job["attempts"] == 2, job  # the one killed in DATA, and the one that worked
        else:
            assert job["attempts"] == 1, job
    # Nothing else arrived: no job was invented or sent under another Message-ID. The one POST
    # in flight when the process died may have been committed before its 202 reached the
    # poster: that job is in the store and is sent too (every stored job is), and it is the
    # only such one (the poster has one request in flight at a time).
    known = {message_id(j) for j in everything}
    unanswered = {message_id_of(m.content) for m in working.messages} - known
    assert len(unanswered) <= 1, unanswered
    for mid in unanswered:
        job, _ = wait_job(second, mid[1:mid.index("@")], "sent", timeout=5)
        assert job["attempts"] == 1, job


def test_sigterm_lets_the_running_send_finish_and_keeps_the_queue(job_store, smtp, squalld):
    store = job_store
    slow = smtp("slow", delay=2.0)
    # One send at a time, so the second job is still queued when SIGTERM comes.
    config = jobs_config(store, slow.url, jobs={"max_concurrent_sends": 1},
                         timeouts={"drain": "8s", "body": "10s"})
    first = squalld(config=config)
    running = accept(first, simple("term-running"))
    slow.wait_data_started(1, timeout=5)
    waiting = accept(first, simple("term-waiting"))
    assert get_job(first, waiting)["status"] == "queued"

    # A POST /email in progress (body half sent) when SIGTERM arrives.
    late_body = json.dumps(simple("term-late")).encode()
    busy = first.conn(timeout=10)
    try:
        busy.send(request("POST", "/email", headers=[JSON], content_length=len(late_body))
                  + late_body[:10])
        assert_plaintext_ok(first.port)  # the server has read those bytes
        first.signal(signal.SIGTERM)
        # The listener closes: new clients are refused.
        assert wait_refused(first.host, first.port, timeout=3), "still accepting after SIGTERM"
        assert first.running(), "exited before the running send finished"
        busy.send(late_body[10:])
        response = busy.read_response()
        assert response.status == 503, response
        assert re.fullmatch(r"\d+", response.get("Retry-After", "")), response
        assert "close" in response.connection_tokens(), response
    finally:
        busy.close()

    # The running send finishes during the drain, then the process exits 0.
    found = wait_messages(slow, [running], timeout=6)
    assert len(found[running]) == 1
    assert first.wait_exit(timeout=8) == 0, first.stderr_text()
    first.stop()  # no ERROR lines
    assert len(slow.data_started) == 1, "the queued job was started during the drain"

    # After a restart the queued job is sent; the one sent before is not sent again.
    working = smtp("accept")
    second = squalld(config=jobs_config(store, working.url))
    assert get_job(second, running)["status"] == "sent"
    found = wait_messages(working, [waiting], timeout=5)
    job, _ = wait_job(second, waiting, "sent", timeout=5)
    assert job["attempts"] == 1, job
    sentinel = accept(second, simple("term-sentinel"))
    wait_messages(working, [sentinel], timeout=5)
    subjects = [str(m.parsed()["Subject"]) for m in working.messages]
    assert sorted(subjects) == ["subject term-sentinel", "subject term-waiting"], subjects


def test_a_lease_shorter_than_a_send_is_refused(tmp_path):
    """A lease protects a job from other senders (or a restarted squalld). If it could end
    while the send holding it still runs, the job would be claimed and sent again, so squalld
    refuses such a configuration and names the key and its line (the runner also ignores a
    claim of a job it is still attempting: tests/unit/jobs/runner_test.cpp)."""
    path = tmp_path / "short-lease.toml"
    path.write_text('[smtp]\nconnect_timeout = "2s"\ntimeout = "20s"\n[jobs]\nlease = "10s"\n')
    result = subprocess.run([squalld_path(), "--config", str(path), "--check-config"],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 1, result
    assert f"{path}:5: [jobs] lease: lease (10000 ms) must be longer than [smtp] " \
           "connect_timeout + timeout (22000 ms)" in result.stderr, result.stderr


# --------------------------------------------------------------------------------------------
# Back-pressure


def test_queue_limit_gives_503_with_retry_after(job_store, smtp, squalld):
    server = smtp("slow", delay=1.5)
    srv = squalld(config=jobs_config(job_store, server.url,
                                     jobs={"max_queued": 2}))
    first = accept(srv, simple("bp-1"))
    second = accept(srv, simple("bp-2"))
    response = post_email(srv, simple("bp-3"))
    assert response.status == 503, response
    assert re.fullmatch(r"[1-9]\d*", response.get("Retry-After", "")), response
    assert response.get("Content-Type", "").startswith("application/json"), response
    assert "error" in response.json()
    assert not response.has("Location")

    # Once the sends finish there is room again.
    server.mode = "accept"  # later sends need not wait
    wait_messages(server, [first, second], timeout=6)
    for job_id in (first, second):
        wait_job(srv, job_id, "sent", timeout=3)
    fourth = accept(srv, simple("bp-4"))
    wait_messages(server, [fourth], timeout=5)
    assert not any(b"bp-3" in m.content for m in server.messages)

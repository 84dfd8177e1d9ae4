"""Kept SMTP connections, black-box: a real squalld sends jobs through the aiosmtpd harness
(smtp_server.py), which counts its sessions and cuts connections like a failing relay. Each test
asserts what the relay sees (sessions, QUIT, each message once) and what GET /jobs/{id} says."""

from __future__ import annotations

import email
import signal
import time

import pytest

from smtp_server import SmtpServer, started_servers
from test_email_jobs import accept, jobs_config, simple, wait_job


@pytest.fixture
def smtp():
    """A factory of started SMTP servers, stopped at teardown."""
    yield from started_servers(SmtpServer)


def config(store, server, connections=2, idle_timeout="30s", **jobs):
    return jobs_config(store, server.url, jobs=jobs or None,
                       smtp={"connections": connections, "idle_timeout": idle_timeout})


def message_ids(messages) -> list[str]:
    return [email.message_from_bytes(m.content)["Message-ID"] for m in messages]


def send_all(srv, server, count, tag):
    """Accepts `count` jobs and waits until each is sent; returns the jobs as GET shows them."""
    ids = [accept(srv, simple(f"{tag}-{i}")) for i in range(count)]
    jobs = [wait_job(srv, job_id, ("sent", "failed"), timeout=20)[0] for job_id in ids]
    assert [job["status"] for job in jobs] == ["sent"] * count, jobs
    return jobs


def test_many_messages_go_over_one_connection(smtp, squalld, tmp_path):
    server = smtp()
    srv = squalld(config=config(tmp_path / "jobs.db", server, connections=1,
                                max_concurrent_sends=2))
    jobs = send_all(srv, server, 20, "one")
    assert [job["attempts"] for job in jobs] == [1] * 20
    messages = server.wait_for(20)
    assert len(set(message_ids(messages))) == 20
    # The sanity of the count: the harness sees every connection squalld makes.
    assert len(server.sessions) == 1, server.sessions
    assert server.sessions[0].messages == 20
    assert not server.sessions[0].closed


def test_connections_bound_the_sessions(smtp, squalld, tmp_path):
    server = smtp()
    srv = squalld(config=config(tmp_path / "jobs.db", server, connections=2,
                                max_concurrent_sends=3))
    send_all(srv, server, 30, "two")
    assert len(server.wait_for(30)) == 30
    assert 1 <= len(server.sessions) <= 2, server.sessions
    assert sum(session.messages for session in server.sessions) == 30, server.sessions


def test_relay_dropping_connections_between_messages(smtp, squalld, tmp_path):
    # The relay closes every connection after its message: each next send connects anew, in
    # the same attempt, and every message arrives exactly once.
    server = smtp(drop="after_message")
    srv = squalld(config=config(tmp_path / "jobs.db", server, connections=1))
    jobs = send_all(srv, server, 6, "drop")
    assert [job["attempts"] for job in jobs] == [1] * 6
    messages = server.wait_for(6)
    assert sorted(message_ids(messages)) == sorted(set(message_ids(messages)))
    assert len(messages) == 6
    assert [session.messages for session in server.sessions] == [1] * 6


def test_kept_connection_found_cut_is_replaced_within_the_attempt(smtp, squalld, tmp_path):
    # The relay cuts a kept connection when it is reused (MAIL FROM gets no reply), as if it
    # had closed it just before: nothing of the message went out, so the message goes over a
    # new connection at once; no attempt is spent and nothing arrives twice.
    server = smtp(drop="second_mail")
    srv = squalld(config=config(tmp_path / "jobs.db", server, connections=1))
    jobs = send_all(srv, server, 4, "cut")
    assert [job["attempts"] for job in jobs] == [1] * 4
    assert [job["last_error"] for job in jobs] == [None] * 4, jobs
    messages = server.wait_for(4)
    assert len(messages) == 4 and len(set(message_ids(messages))) == 4
    assert [session.messages for session in server.sessions] == [1] * 4


def test_failure_mid_data_is_retried_not_counted_as_sent(smtp, squalld, tmp_path):
    # The connection drops after the message went out, before the relay's verdict: the job is
    # not sent (it may or may not have arrived), so it is retried later, with the same
    # Message-ID, and the connection is not kept.
    server = smtp(drop="data", drop_count=1)
    srv = squalld(config=config(tmp_path / "jobs.db", server, connections=1))
    job_id = accept(srv, simple("mid-data"))
    job, history = wait_job(srv, job_id, ("sent", "failed"), timeout=20, interval=0.01)
    assert job["status"] == "sent", history
    assert job["attempts"] == 2, history
    [message] = server.wait_for(1)
    assert server.data_ends == 2  # the message went out twice, and was taken the second time
    assert len(server.messages) == 1
    assert message_ids([message]) == [f"<{job_id}@example.com>"]
    assert [session.messages for session in server.sessions] == [0, 1]


def test_idle_connection_is_closed_with_quit(smtp, squalld, tmp_path):
    server = smtp()
    srv = squalld(config=config(tmp_path / "jobs.db", server, connections=1,
                                idle_timeout="200ms"))
    send_all(srv, server, 1, "idle")
    [session] = server.wait_sessions_closed(1, timeout=10)
    assert session.quit and session.messages == 1
    # The next message opens a new connection, which is closed again once idle.
    send_all(srv, server, 1, "idle-again")
    sessions = server.wait_sessions_closed(2, timeout=10)
    assert [(s.messages, s.quit) for s in sessions] == [(1, True), (1, True)]


def test_kept_connection_does_not_hold_up_the_exit(smtp, squalld, tmp_path):
    # The relay never answers QUIT: at the end squalld still sends QUIT to its kept connection,
    # but does not wait [smtp] timeout (20 s) for the reply.
    server = smtp(hang_on_quit=True)
    srv = squalld(config=config(tmp_path / "jobs.db", server, connections=1))
    send_all(srv, server, 2, "exit")
    assert len(server.sessions) == 1 and not server.sessions[0].closed
    started = time.monotonic()
    srv.signal(signal.SIGTERM)
    assert srv.wait_exit(timeout=10) == 0
    assert time.monotonic() - started < 5
    [session] = server.wait_sessions_closed(1)
    assert session.quit

"""Several squalld nodes on one PostgreSQL job store, black-box: two nodes accept and send
together, one is killed with kill -9 in the middle of its sends and the other takes its jobs
over at once (not after the lease): exactly once when the kill lands before the end of the
messages' data, at most one extra copy (same Message-ID) per send in the window between the
relay's acceptance and the "sent" record when it lands there, which is measured; NOTIFY wakes a node that is not polling; a lost database
answers 503 on POST /email while other routes serve, and comes back by itself; a password in
the URL is refused. The server is private (conftest.py's pg_server)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter

from pg_helpers import PrivateServer, psql
from squall_helpers import squalld_path
from test_email_jobs import (  # noqa: F401  (smtp is a fixture)
    JSON,
    accept,
    jobs_config,
    message_id,
    message_id_of,
    post_email,
    simple,
    smtp,
    wait_job,
    wait_messages,
)


# What squalld claims ahead per send slot (server/jobs_service.cpp, kPrefetchPerSend).
PREFETCH_PER_SEND = 16

def node_config(store_url, smtp_url, jobs=None, **tables):
    return jobs_config(store_url, smtp_url, jobs=jobs, **tables)


def test_two_nodes_share_one_queue_and_kill_9_before_the_end_of_data_sends_each_job_once(
        pg_store, smtp, squalld):
    """Exactly once: node a is killed while its sends are in the SMTP dialogue before the end
    of the message (the relay holds every DATA command before its 354), so the relay took
    nothing of them; node b takes a's jobs over at once (a's database session ended, not the
    hour of the lease) and every accepted job arrives exactly once."""
    server = smtp("hold_data")
    config = node_config(pg_store, server.url, jobs={"lease": "1h", "max_concurrent_sends": 2})
    a = squalld(config=config, allow_errors=True)
    b = squalld(config=config)
    ids = [accept(a if n % 2 == 0 else b, simple(f"m{n}")) for n in range(30)]
    # An Idempotency-Key is one job whichever node gets the repeat.
    key = ("Idempotency-Key", "shared-key")
    first = post_email(a, simple("keyed"), headers=(JSON, key))
    again = post_email(b, simple("keyed"), headers=(JSON, key))
    assert first.status == 202 and again.status == 200, (first, again)
    assert again.json()["id"] == first.json()["id"]
    ids.append(first.json()["id"])

    # Node a has sends in DATA, and no message is complete anywhere.
    deadline = time.monotonic() + 10
    while a.metrics().value("squall_jobs_sends_running") < 1:
        assert time.monotonic() < deadline, "node a never started a send"
        time.sleep(0.02)
    server.wait_data_held(2)
    a.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert a.wait_exit(timeout=5) == -signal.SIGKILL
    assert not server.messages
    server.release_data()

    wait_messages(server, ids, timeout=40)
    assert time.monotonic() - killed_at < 40  # not the hour of the lease
    b.wait_for_line("is gone (its database session ended)", timeout=5)
    for job_id in ids:
        wait_job(b, job_id, "sent", timeout=10)
    copies = Counter(message_id_of(m.content) for m in server.messages)
    assert copies == Counter({message_id(j): 1 for j in ids}), copies


def test_two_nodes_kill_9_after_the_final_dot_repeats_at_most_the_sends_in_that_window(
        pg_store, smtp, squalld):
    """The window no SMTP client can close (RFC 1047): once the relay has the final dot, it
    keeps the message whether or not its client lives to read the 250 and record "sent". Here
    the relay waits 0.3 s after the dot, so node a is killed inside that window: a job whose
    message had ended and whose "sent" was not recorded may arrive twice (at most once more per
    send in the window, node a's max_concurrent_sends in all), with the same Message-ID, so
    that the receiving side can drop the copy; every other job arrives exactly once. And the
    window itself is only the time from the 250 to the "sent" record, measured here."""
    server = smtp("slow", delay=0.3)
    config = node_config(pg_store, server.url, jobs={"lease": "1h", "max_concurrent_sends": 2})
    a = squalld(config=config, allow_errors=True)
    b = squalld(config=config)
    ids = [accept(a if n % 2 == 0 else b, simple(f"m{n}")) for n in range(30)]

    deadline = time.monotonic() + 10
    while a.metrics().value("squall_jobs_sends_running") < 1:
        assert time.monotonic() < deadline, "node a never started a send"
        time.sleep(0.02)
    a.signal(signal.SIGKILL)
    assert a.wait_exit(timeout=5) == -signal.SIGKILL
    ended = {message_id_of(content) for content in list(server.data_started)}
    recorded_sent = set(psql(pg_store, "SELECT id FROM squall_jobs WHERE state = 'sent'").split())

    wait_messages(server, ids, timeout=40)
    b.wait_for_line("is gone (its database session ended)", timeout=5)
    for job_id in ids:
        wait_job(b, job_id, "sent", timeout=10)
    messages = list(server.messages)
    copies = Counter(message_id_of(m.content) for m in messages)
    assert set(copies) == {message_id(j) for j in ids}, copies
    twice = {mid for mid, count in copies.items() if count > 1}
    # Only a send whose message had ended before the kill and was not recorded "sent".
    assert twice <= ended - {message_id(j) for j in recorded_sent}, (twice, ended)
    assert all(count <= 2 for count in copies.values()), copies
    assert len(twice) <= 2  # node a's max_concurrent_sends

    # The window: from the relay's 250 to the "sent" record's timestamp (taken as the batch
    # of outcomes is written; its commit follows), for the last copy of each message. It
    # holds no retry, poll or lease: the record follows the reply at once.
    finished = dict(line.split("|") for line in psql(
        pg_store, "SELECT id, finished_ms FROM squall_jobs WHERE state = 'sent'").splitlines())
    taken = {message_id_of(m.content): m.taken_at for m in messages}
    windows = sorted(int(finished[j]) - taken[message_id(j)] * 1000 for j in ids)  # ms
    median, largest = windows[len(windows) // 2], windows[-1]
    print(f"relay's 250 -> 'sent' stamped: median {median:.2f} ms, max {largest:.2f} ms "
          f"({len(windows)} jobs)")
    assert median < 250 and largest < 1000, windows


def test_notify_wakes_a_node_that_is_not_polling(pg_store, smtp, squalld):
    stalled = smtp("slow", delay=60.0)
    working = smtp("accept")
    # Node a takes one send at a time and its relay never answers: its second job waits...
    a = squalld(config=node_config(pg_store, stalled.url, jobs={"max_concurrent_sends": 1},
                                   timeouts={"drain": "1s"}))
    first = accept(a, simple("stuck"))
    stalled.wait_data_started(1)
    # Node a still claims ahead for its send slot (squalld prefetches 16 jobs per slot), so its
    # own insert could make it hold the job meant for b before b's NOTIFY claim commits. Once a
    # holds more than half of its prefetch it claims no more: fill it first.
    for index in range(PREFETCH_PER_SEND):
        accept(a, simple(f"held{index}"))
    deadline = time.monotonic() + 10
    while a.metrics().value("squall_jobs_claimed_total", 0) < 1 + PREFETCH_PER_SEND // 2 + 1:
        assert time.monotonic() < deadline, "node a did not claim ahead"
        time.sleep(0.02)
    # ...for node b, which polls once an hour: only the NOTIFY of a's insert can wake it. At
    # its start b claims twice, each finding nothing due: once for its first poll and once
    # when its LISTEN is in place (for what was inserted while it was not listening); each poke
    # gets a claim of its own that begins after it, and nothing else pokes b. So once b has
    # committed two rounds it is listening and has claimed since: a job inserted from then on
    # reaches b by NOTIFY or not at all (an insert before that could be taken by one of those
    # claims, and prove nothing).
    b = squalld(config=node_config(pg_store, working.url, jobs={"poll_interval": "1h"}))
    deadline = time.monotonic() + 10
    while b.metrics().value("squall_jobs_runner_commits_total", 0) < 2:
        assert time.monotonic() < deadline, "node b did not claim at its start and at its LISTEN"
        time.sleep(0.02)
    second = accept(a, simple("woken"))
    started = time.monotonic()
    wait_messages(working, [second], timeout=5)
    assert time.monotonic() - started < 5
    wait_job(b, second, "sent")
    assert wait_job(a, first, "sending")[0]["status"] == "sending"


def test_a_lost_database_is_503_for_post_email_only_and_comes_back(smtp, squalld):
    database = PrivateServer()  # its own, since it is stopped and started again
    try:
        server = smtp("accept")
        srv = squalld(config=node_config(database.url, server.url), allow_errors=True)
        before = accept(srv, simple("before"))
        wait_messages(server, [before])
        database.stop()

        refused = post_email(srv, simple("during"))
        assert refused.status == 503, refused
        assert refused.get("Retry-After") == "5", refused
        assert srv.get("/plaintext").status == 200
        health = srv.get("/healthz")
        assert health.status == 503 and health.json()["store"] == "failing", health

        database.start_again()
        deadline = time.monotonic() + 15
        while srv.get("/healthz").status != 200:
            assert time.monotonic() < deadline, "the store did not come back"
            time.sleep(0.1)
        after = accept(srv, simple("after"))
        wait_messages(server, [after])
        srv.wait_for_line("the job store accepts writes again")
    finally:
        database.remove()


def test_a_password_in_the_url_is_a_config_error(tmp_path):
    config = tmp_path / "squalld.toml"
    config.write_text('[jobs]\nstore = "postgresql://squall:hunter2@db/squall"\n')
    result = subprocess.run([squalld_path(), "--check-config", "--config", str(config)],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 1, result
    assert f"{config}:2: [jobs] store: the URL contains a password" in result.stderr
    assert "hunter2" not in result.stderr

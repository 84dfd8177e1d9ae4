"""Exposing squalld: API tokens on the mail routes beyond loopback, route access rules, the
sender and recipient policy, rate limits and queue shares, and what GET /jobs/{id} may show."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from smtp_server import SmtpServer, closed_port, started_servers
from squall_helpers import Conn, request, squalld_path

SENDER_ADDR = "noreply@example.com"
JSON = ("Content-Type", "application/json")


@pytest.fixture
def smtp():
    yield from started_servers(SmtpServer)


def new_token(name: str) -> tuple[str, str]:
    """(token, tokens-file line) from `squalld --new-token NAME`."""
    out = subprocess.run([squalld_path(), "--new-token", name], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith("token: sqt_"), out
    token = lines[0].removeprefix("token: ")
    line = [l for l in lines if l.startswith(name + " sha256:")][0]
    return token, line


def tokens_file(tmp_path, *lines) -> str:
    path = tmp_path / "tokens"
    path.write_text("# squalld API tokens\n" + "".join(l + "\n" for l in lines))
    return str(path)


def mail_config(tmp_path, smtp_url, listen="127.0.0.1:0", **tables) -> dict:
    config = {
        "server": {"listen": [listen], "thread_pool_size": 4},
        "smtp": {"url": smtp_url, "starttls": "off", "from": f"Squall <{SENDER_ADDR}>",
                 "connect_timeout": "2s", "timeout": "10s"},
        "jobs": {"store": str(tmp_path / "jobs.db"), "poll_interval": "50ms",
                 "retry_initial": "1h", "retry_max": "1h", "lease": "30s"},
    }
    for table, keys in tables.items():
        config.setdefault(table, {}).update(keys)
    return config


def call(srv, method, target, token=None, body=None, headers=(JSON,)) -> object:
    """One request from 127.0.0.1 on a fresh connection."""
    headers = list(headers)
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    if isinstance(body, dict):
        body = json.dumps(body)
    data = body.encode() if isinstance(body, str) else (body or b"")
    with Conn(srv.port, host="127.0.0.1") as c:
        c.send(request(method, target, headers=headers, body=data))
        return c.read_response()


def email(n="x", **extra) -> dict:
    return {"to": f"rcpt-{n}@example.com", "subject": f"subject {n}", "text": f"body {n}\n",
            **extra}


def wait_status(srv, job_id, token, states, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = call(srv, "GET", f"/jobs/{job_id}", token=token)
        assert response.status == 200, response
        job = response.json()
        if job["status"] in states:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# Secure by default


def test_public_address_without_tokens_is_refused_at_start(squalld, tmp_path):
    srv = squalld(config=mail_config(tmp_path, "smtp://127.0.0.1:25", listen="0.0.0.0:0"),
                  start=False, allow_errors=True)
    proc = subprocess.run(srv.command(), capture_output=True, text=True, timeout=10,
                          cwd=srv.workdir)
    assert proc.returncode == 1, proc
    assert "[server] listen 0.0.0.0:0 is not a loopback address" in proc.stderr, proc.stderr
    assert "[auth] tokens_file" in proc.stderr and "[auth] anonymous = true" in proc.stderr
    assert "open mail relay" in proc.stderr

    # --check-config says the same, and explains a configuration that passes.
    check = subprocess.run([squalld_path(), "--check-config", "--config", str(srv.config_path)],
                           capture_output=True, text=True, timeout=10)
    assert check.returncode == 1 and "[auth] tokens_file" in check.stderr, check
    token, line = new_token("ops")
    srv.write_config(mail_config(tmp_path, "smtp://127.0.0.1:25", listen="0.0.0.0:0",
                                 auth={"tokens_file": tokens_file(tmp_path, line)}))
    check = subprocess.run([squalld_path(), "--check-config", "--config", str(srv.config_path)],
                           capture_output=True, text=True, timeout=10)
    assert check.returncode == 0, check
    assert "listens beyond loopback (0.0.0.0:0)" in check.stdout, check.stdout
    assert "1 API token(s)" in check.stdout
    assert "POST /email and GET /jobs/{id} require a token" in check.stdout


def test_anonymous_true_allows_a_public_address(squalld, tmp_path, smtp):
    server = smtp()
    srv = squalld(config=mail_config(tmp_path, server.url, listen="0.0.0.0:0",
                                     auth={"anonymous": True}))
    response = call(srv, "POST", "/email", body=email("anon"))
    assert response.status == 202, response


def test_tokens_guard_the_mail_routes_and_are_never_logged(squalld, tmp_path, smtp):
    server = smtp()
    alice, alice_line = new_token("alice")
    bob, bob_line = new_token("bob")
    srv = squalld(config=mail_config(
        tmp_path, server.url, listen="0.0.0.0:0",
        auth={"tokens_file": tokens_file(tmp_path, alice_line, bob_line)}))

    missing = call(srv, "POST", "/email", body=email("none"))
    assert missing.status == 401, missing
    assert missing.get("WWW-Authenticate") == 'Bearer realm="squalld"'
    assert missing.json()["field"] == "Authorization"
    wrong = call(srv, "POST", "/email", token=alice + "0", body=email("wrong"))
    assert wrong.status == 401, wrong
    assert 'error="invalid_token"' in wrong.get("WWW-Authenticate")
    basic = call(srv, "POST", "/email", body=email("basic"),
                 headers=[JSON, ("Authorization", "Basic YWxpY2U6eA==")])
    assert basic.status == 401, basic

    accepted = call(srv, "POST", "/email", token=alice, body=email("alice"))
    assert accepted.status == 202, accepted
    job_id = accepted.json()["id"]
    server.wait_for(1)

    # Only the token that created a job sees it; everyone else gets the answer of a missing one.
    assert call(srv, "GET", f"/jobs/{job_id}").status == 401
    assert call(srv, "GET", f"/jobs/{job_id}", token=bob).status == 404
    missing_job = call(srv, "GET", "/jobs/" + "0" * 32, token=bob)
    assert call(srv, "GET", f"/jobs/{job_id}", token=bob).body == missing_job.body
    assert wait_status(srv, job_id, alice, ("sent",))["status"] == "sent"

    srv.stop()
    for text in (srv.stderr_text(), srv.access_log.read_text()):
        assert alice not in text and bob not in text
        assert alice[4:20] not in text


def test_idempotency_keys_are_per_token(squalld, tmp_path, smtp):
    server = smtp()
    alice, alice_line = new_token("alice")
    bob, bob_line = new_token("bob")
    srv = squalld(config=mail_config(
        tmp_path, server.url, auth={"tokens_file": tokens_file(tmp_path, alice_line, bob_line)}))
    key = ("Idempotency-Key", "order-1")
    first = call(srv, "POST", "/email", token=alice, body=email("a"), headers=[JSON, key])
    assert first.status == 202, first
    # The same key from another token is another job: no 422, no hint of alice's job id.
    other = call(srv, "POST", "/email", token=bob, body=email("b"), headers=[JSON, key])
    assert other.status == 202, other
    assert other.json()["id"] != first.json()["id"]
    repeat = call(srv, "POST", "/email", token=alice, body=email("a"), headers=[JSON, key])
    assert repeat.status == 200 and repeat.json()["id"] == first.json()["id"], repeat
    # Tokens configured on loopback: the mail routes need one there too.
    assert call(srv, "POST", "/email", body=email("c")).status == 401


def test_tokens_file_is_read_again_on_reload(squalld, tmp_path, smtp):
    server = smtp()
    alice, alice_line = new_token("alice")
    bob, bob_line = new_token("bob")
    srv = squalld(config=mail_config(
        tmp_path, server.url, auth={"tokens_file": tokens_file(tmp_path, alice_line)}))
    assert call(srv, "POST", "/email", token=alice, body=email("1")).status == 202
    assert call(srv, "POST", "/email", token=bob, body=email("2")).status == 401
    tokens_file(tmp_path, bob_line)  # alice revoked, bob added
    mark = srv.line_count()
    srv.signal(signal.SIGHUP)
    srv.wait_for_line("configuration reloaded", start=mark)
    assert call(srv, "POST", "/email", token=bob, body=email("3")).status == 202
    assert call(srv, "POST", "/email", token=alice, body=email("4")).status == 401


def test_route_access_rules(squalld, tmp_path, smtp):
    server = smtp()
    ops, ops_line = new_token("ops")
    srv = squalld(config=mail_config(
        tmp_path, server.url,
        auth={"tokens_file": tokens_file(tmp_path, ops_line), "metrics": "token",
              "healthz": "loopback", "echo": "open"}))
    refused = call(srv, "GET", "/metrics")
    assert refused.status == 401 and refused.get("WWW-Authenticate"), refused
    assert call(srv, "GET", "/metrics", token=ops).status == 200
    assert call(srv, "GET", "/healthz").status == 200  # from loopback
    assert call(srv, "POST", "/echo", body="x", headers=[("Content-Type", "text/plain")]).body \
        == b"x"
    assert call(srv, "GET", "/plaintext").status == 200


def test_default_route_rules_keep_loopback_working(squalld, tmp_path, smtp):
    """make run and the README's curl lines: loopback, no tokens, nothing needs one."""
    server = smtp()
    srv = squalld(config=mail_config(tmp_path, server.url))
    assert call(srv, "GET", "/metrics").status == 200
    assert call(srv, "GET", "/healthz").status == 200
    assert call(srv, "POST", "/echo", body="x", headers=[("Content-Type", "text/plain")]).status \
        == 200
    accepted = call(srv, "POST", "/email", body=email("local"))
    assert accepted.status == 202, accepted
    assert call(srv, "GET", f"/jobs/{accepted.json()['id']}").status == 200


# --------------------------------------------------------------------------------------------
# Requests a web page could forge


def test_post_email_requires_application_json(squalld, tmp_path, smtp):
    server = smtp()
    srv = squalld(config=mail_config(tmp_path, server.url))
    for headers in ([], [("Content-Type", "text/plain")],
                    [("Content-Type", "application/x-www-form-urlencoded")]):
        response = call(srv, "POST", "/email", body=email("ct"), headers=headers)
        assert response.status == 415, (headers, response)
        assert response.json()["field"] == "Content-Type"
    assert server.rcpt_attempts == []


# --------------------------------------------------------------------------------------------
# Sender and recipient policy


def test_sender_policy_per_token(squalld, tmp_path, smtp):
    server = smtp()
    alice, alice_line = new_token("alice")
    bob, bob_line = new_token("bob")
    srv = squalld(config=mail_config(tmp_path, server.url, auth={"tokens_file": tokens_file(
        tmp_path, alice_line + " from=news@example.org,@alice.example", bob_line)}))

    for sender in ("News <news@example.org>", "anyone@Alice.example", SENDER_ADDR):
        response = call(srv, "POST", "/email", token=alice, body=email("a", **{"from": sender}))
        assert response.status == 202, (sender, response)
    refused = call(srv, "POST", "/email", token=alice,
                   body=email("a", **{"from": "CEO <CEO@Example.org>"}))
    assert refused.status == 403, refused
    assert refused.json()["field"] == "from"
    assert "may not send from ceo@example.org " in refused.json()["error"], refused.json()
    # bob's line lists no senders: [smtp] from only.
    assert call(srv, "POST", "/email", token=bob,
                body=email("b", **{"from": "news@example.org"})).status == 403
    assert call(srv, "POST", "/email", token=bob, body=email("b")).status == 202
    messages = server.wait_for(4)
    assert sorted(m.mail_from for m in messages) == sorted(
        ["news@example.org", "anyone@Alice.example", SENDER_ADDR, SENDER_ADDR])


def test_recipient_policy(squalld, tmp_path, smtp):
    server = smtp()
    srv = squalld(config=mail_config(
        tmp_path, server.url,
        policy={"recipient_domains": ["example.com"],
                "blocked_recipient_domains": ["blocked.example.com"]}))
    literal = call(srv, "POST", "/email",
                   body={"to": ["ok@example.com"], "bcc": "root@[127.0.0.1]",
                         "subject": "s", "text": "t"})
    assert literal.status == 400, literal
    assert literal.json()["field"] == "bcc[0]"
    assert "ip_literal_recipients" in literal.json()["error"]
    outside = call(srv, "POST", "/email", body=email("x", to=["a@example.com", "b@example.net"]))
    assert outside.status == 400 and outside.json()["field"] == "to[1]", outside
    assert "recipient_domains" in outside.json()["error"]
    blocked = call(srv, "POST", "/email", body=email("x", cc="c@Blocked.Example.com"))
    assert blocked.status == 400 and blocked.json()["field"] == "cc[0]", blocked
    assert "the domain blocked.example.com is not allowed" in blocked.json()["error"], blocked
    assert call(srv, "POST", "/email", body=email("x", to="d@sub.example.com")).status == 202
    server.wait_for(1)
    assert server.rcpt_attempts == ["d@sub.example.com"]


def test_ip_literals_can_be_allowed(squalld, tmp_path, smtp):
    server = smtp()
    srv = squalld(config=mail_config(tmp_path, server.url,
                                     policy={"ip_literal_recipients": True}))
    assert call(srv, "POST", "/email", body=email("x", to="root@[127.0.0.1]")).status == 202


# --------------------------------------------------------------------------------------------
# Abuse limits


def test_a_flooding_token_is_limited_and_another_is_served(squalld, tmp_path, smtp):
    server = smtp()
    flood, flood_line = new_token("flood")
    quiet, quiet_line = new_token("quiet")
    srv = squalld(config=mail_config(
        tmp_path, server.url, auth={"tokens_file": tokens_file(tmp_path, flood_line, quiet_line)},
        quota={"token_burst": 5, "token_per_minute": 60}))
    statuses = []
    limited = None
    for i in range(40):
        response = call(srv, "POST", "/email", token=flood, body=email(f"f{i}"))
        statuses.append(response.status)
        if response.status == 429:
            limited = response
    assert statuses[:5] == [202] * 5, statuses
    assert statuses.count(202) <= 7, statuses  # 5 at once, then one a second
    assert limited is not None
    assert 1 <= int(limited.get("Retry-After")) <= 2, limited
    assert "[quota] token_per_minute" in limited.json()["error"]
    for i in range(3):
        assert call(srv, "POST", "/email", token=quiet, body=email(f"q{i}")).status == 202


def test_client_address_rate_limit(squalld, tmp_path, smtp):
    server = smtp()
    srv = squalld(config=mail_config(tmp_path, server.url,
                                     quota={"address_burst": 3, "address_per_minute": 6}))
    statuses = [call(srv, "POST", "/email", body=email(f"a{i}")).status for i in range(5)]
    assert statuses[:3] == [202] * 3 and statuses[3:] == [429, 429], statuses
    limited = call(srv, "POST", "/email", body=email("again"))
    assert "[quota] address_per_minute" in limited.json()["error"]
    assert int(limited.get("Retry-After")) >= 5


def test_one_token_cannot_fill_the_queue(squalld, tmp_path):
    # Nothing listens at the relay and retries wait an hour: accepted jobs stay queued.
    flood, flood_line = new_token("flood")
    quiet, quiet_line = new_token("quiet")
    srv = squalld(config=mail_config(
        tmp_path, f"smtp://127.0.0.1:{closed_port()}",
        auth={"tokens_file": tokens_file(tmp_path, flood_line, quiet_line)},
        quota={"max_queued_per_client": 3}), allow_errors=True)
    statuses = [call(srv, "POST", "/email", token=flood, body=email(f"f{i}")).status
                for i in range(5)]
    assert statuses == [202, 202, 202, 429, 429], statuses
    share = call(srv, "POST", "/email", token=flood, body=email("f"))
    assert "max_queued_per_client" in share.json()["error"] and share.get("Retry-After")
    assert call(srv, "POST", "/email", token=quiet, body=email("q")).status == 202

    # The shares survive a restart: the store knows whose jobs are waiting.
    srv.stop()
    again = squalld(config=srv.config, allow_errors=True)
    assert call(again, "POST", "/email", token=flood, body=email("after")).status == 429
    assert call(again, "POST", "/email", token=quiet, body=email("q2")).status == 202


def test_the_queue_is_bounded_in_bytes(squalld, tmp_path):
    srv = squalld(config=mail_config(tmp_path, f"smtp://127.0.0.1:{closed_port()}",
                                     jobs={"max_queued_bytes": "3KiB"}), allow_errors=True)
    big = email("big", text="x" * 1200)
    statuses = [call(srv, "POST", "/email", body=big).status for _ in range(4)]
    assert statuses == [202, 202, 503, 503], statuses
    full = call(srv, "POST", "/email", body=big)
    assert "[jobs] max_queued_bytes" in full.json()["error"] and full.get("Retry-After")
    # A small one still fits.
    assert call(srv, "POST", "/email", body=email("small")).status == 202


# --------------------------------------------------------------------------------------------
# The public job view


def test_job_view_never_shows_addresses_or_the_relay(squalld, tmp_path, smtp):
    server = smtp("permfail", fail_at="rcpt", fail_recipients={"secret-bcc@example.net"})
    srv = squalld(config=mail_config(tmp_path, server.url))
    accepted = call(srv, "POST", "/email",
                    body=email("v", bcc="secret-bcc@example.net"))
    assert accepted.status == 202, accepted
    job = wait_status(srv, accepted.json()["id"], None, ("failed",))
    assert job["last_error"] == "relay refused a recipient (550)", job
    text = json.dumps(job)
    assert "secret-bcc" not in text and "127.0.0.1" not in text and str(server.port) not in text
    # The error log keeps the whole story.
    assert "secret-bcc@example.net" in srv.stderr_text()

    (tmp_path / "down").mkdir()
    down = squalld(config=mail_config(tmp_path / "down", f"smtp://127.0.0.1:{closed_port()}"),
                   allow_errors=True)
    accepted = call(down, "POST", "/email", body=email("d"))
    job = wait_status(down, accepted.json()["id"], None, ("retrying",))
    assert job["last_error"] == "could not connect to the relay", job


def test_a_reload_to_a_public_address_without_tokens_is_refused(squalld, tmp_path, smtp):
    server = smtp()
    config = mail_config(tmp_path, server.url)
    srv = squalld(config=config, allow_errors=True)
    srv.write_config({**config, "server": {"listen": ["127.0.0.1:0", "0.0.0.0:0"]}})
    mark = srv.line_count()
    srv.signal(signal.SIGHUP)
    line, _ = srv.wait_for_line("reload refused", start=mark)
    assert "[server] listen 0.0.0.0:0 is not a loopback address" in line, line
    assert "[auth] tokens_file" in line
    # Still serving the old configuration, on loopback only.
    assert call(srv, "POST", "/email", body=email("still")).status == 202
    assert len(srv.addresses) == 1

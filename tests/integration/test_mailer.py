"""The SMTP side of email jobs: build/examples/send_email (squall::jobs' MIME builder and
SmtpMailer) against the aiosmtpd harness in smtp_server.py."""

import email.utils
import json
import os
import shutil
import ssl
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from smtp_server import SmtpServer, closed_port, smtp_server  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
SEND_EMAIL = os.environ.get("SEND_EMAIL") or str(REPO / "build" / "examples" / "send_email")

pytestmark = pytest.mark.skipif(
    not os.access(SEND_EMAIL, os.X_OK), reason=f"{SEND_EMAIL} is missing: run `make examples`"
)

SENDER = "Squall Service <squall@example.com>"
PASSWORD = "s3cret-Pa55word"


def send(body, url, *args, password=None, timeout=30):
    """Runs send_email; returns (exit status, the JSON it printed, seconds taken)."""
    env = {k: v for k, v in os.environ.items() if k != "SMTP_PASSWORD"}
    if password is not None:
        env["SMTP_PASSWORD"] = password
    started = time.monotonic()
    proc = subprocess.run(
        [SEND_EMAIL, "--url", url, "--from", SENDER, *args],
        input=json.dumps(body).encode(),
        capture_output=True,
        timeout=timeout,
        env=env,
    )
    elapsed = time.monotonic() - started
    assert proc.stderr == b"", proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 1, proc.stdout
    return proc.returncode, json.loads(lines[0]), elapsed


SIMPLE = {"to": "rcpt@example.com", "subject": "hello", "text": "hello\n"}


def test_delivered_message_as_python_reads_it(smtp_server):
    server = smtp_server()
    text = (
        "Grüße aus Köln ✓ — UTF-8 intact\n"
        ".\n"  # alone on a line: would end DATA if libcurl did not dot-stuff
        ".leading dot\n"
        "..two dots\n"
        + "long line " * 20
        + "\nA = B\n"
        "last line without a line break"
    )
    html = "<p>Grüße ✓</p>\n<p>.dot</p>\n"
    body = {
        "from": "Jörg Müller <joerg@example.de>",
        "to": ["Bob <bob@example.com>", "Ünïcödé ✓ <u@example.com>"],
        "cc": ["\"Doe, John\" <john@example.org>"],
        "bcc": "hidden@example.net",
        "reply_to": "Support <help@example.com>",
        "subject": "Grüße ✓ " * 12,
        "text": text,
        "html": html,
    }
    status, result, _ = send(body, server.url, "--job-id", "job-0042")
    assert status == 0, result
    assert result["outcome"] == "sent"
    assert result["smtp_code"] == 250
    assert result["detail"] == "SMTP 250 2.0.0 OK: queued as test-1"
    assert result["message_id"] == "job-0042@example.com"

    [received] = server.wait_for(1)
    assert received.mail_from == "joerg@example.de"
    assert received.rcpt_tos == [
        "bob@example.com",
        "u@example.com",
        "john@example.org",
        "hidden@example.net",
    ]
    # Dot-stuffing round trip: aiosmtpd removed the dots libcurl added.
    raw = received.content
    assert b"\r\n.\r\n.leading dot\r\n..two dots\r\n" in raw
    assert b"\r\n<p>.dot</p>\r\n" in raw
    assert all(byte < 0x80 for byte in raw)
    assert all(len(line) <= 78 for line in raw.split(b"\r\n")), "a line over 78 characters"

    msg = received.parsed()
    assert msg["From"].addresses[0].display_name == "Jörg Müller"
    assert msg["From"].addresses[0].addr_spec == "joerg@example.de"
    assert [(a.display_name, a.addr_spec) for a in msg["To"].addresses] == [
        ("Bob", "bob@example.com"),
        ("Ünïcödé ✓", "u@example.com"),
    ]
    assert [(a.display_name, a.addr_spec) for a in msg["Cc"].addresses] == [
        ("Doe, John", "john@example.org")
    ]
    assert msg["Reply-To"].addresses[0].addr_spec == "help@example.com"
    assert str(msg["Subject"]) == body["subject"]
    assert msg["Message-ID"] == "<job-0042@example.com>"
    sent_at = email.utils.parsedate_to_datetime(msg["Date"])
    assert sent_at.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - sent_at).total_seconds()) < 60
    assert msg["MIME-Version"] == "1.0"

    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [part.get_content_type() for part in parts] == ["text/plain", "text/html"]
    assert [part.get_content_charset() for part in parts] == ["utf-8", "utf-8"]
    assert parts[0].get_content().replace("\r\n", "\n") == text
    assert parts[1].get_content().replace("\r\n", "\n") == html


def test_bcc_is_in_the_envelope_only(smtp_server):
    server = smtp_server()
    body = {
        "to": "visible@example.com",
        "bcc": ["secret1@example.com", "Secret Two <secret2@example.com>"],
        "subject": "bcc",
        "text": "x",
    }
    status, result, _ = send(body, server.url)
    assert status == 0, result
    [received] = server.wait_for(1)
    assert received.rcpt_tos == [
        "visible@example.com",
        "secret1@example.com",
        "secret2@example.com",
    ]
    assert b"secret" not in received.content.lower()
    msg = received.parsed()
    assert msg["Bcc"] is None
    assert msg["From"].addresses[0].addr_spec == "squall@example.com"  # the default sender
    assert received.mail_from == "squall@example.com"


def test_text_only_and_html_only(smtp_server):
    server = smtp_server()
    assert send({**SIMPLE, "text": "just text"}, server.url)[0] == 0
    assert send({"to": "a@example.com", "subject": "h", "html": "<b>html</b>"}, server.url)[0] == 0
    plain, html = (m.parsed() for m in server.wait_for(2))
    assert plain.get_content_type() == "text/plain"
    assert plain.get_content() == "just text"
    assert html.get_content_type() == "text/html"
    assert html.get_content() == "<b>html</b>"


@pytest.mark.parametrize("fail_at, stage", [("rcpt", "RCPT TO:<rcpt@example.com>"),
                                            ("data", "end of DATA")])
def test_tempfail_is_temporary(smtp_server, fail_at, stage):
    server = smtp_server("tempfail", fail_at=fail_at)
    status, result, _ = send(SIMPLE, server.url)
    assert status == 1
    assert result["outcome"] == "temporary_failure"
    assert result["smtp_code"] == 451
    assert result["detail"] == f"SMTP 451 4.3.0 try again later ({stage})"
    assert server.messages == []


@pytest.mark.parametrize("fail_at, stage", [("rcpt", "RCPT TO:<rcpt@example.com>"),
                                            ("data", "end of DATA")])
def test_permfail_is_permanent(smtp_server, fail_at, stage):
    server = smtp_server("permfail", fail_at=fail_at)
    status, result, _ = send(SIMPLE, server.url)
    assert status == 2
    assert result["outcome"] == "permanent_failure"
    assert result["smtp_code"] == 550
    assert result["detail"] == f"SMTP 550 5.7.1 rejected for testing ({stage})"
    assert server.messages == []


def test_one_refused_recipient_fails_the_whole_send(smtp_server):
    # No partial delivery: a retry must not send the accepted recipients a second copy.
    server = smtp_server("tempfail", fail_recipients={"second@example.com"})
    body = {**SIMPLE, "to": ["first@example.com", "second@example.com", "third@example.com"]}
    status, result, _ = send(body, server.url)
    assert status == 1
    assert result["detail"] == "SMTP 451 4.3.0 try again later (RCPT TO:<second@example.com>)"
    assert server.rcpt_attempts == ["first@example.com", "second@example.com"]
    assert server.messages == []


def test_connection_refused_is_temporary():
    url = f"smtp://127.0.0.1:{closed_port()}"
    status, result, _ = send(SIMPLE, url)
    assert status == 1
    assert result["outcome"] == "temporary_failure"
    assert result["smtp_code"] == 0
    assert result["detail"] == f"connection refused: {url}"


def test_slow_server_times_out_as_temporary(smtp_server):
    server = smtp_server("slow", delay=5.0)
    status, result, elapsed = send(SIMPLE, server.url, "--timeout", "600")
    assert status == 1
    assert result["outcome"] == "temporary_failure"
    assert result["detail"] == f"timed out (end of DATA): {server.url}"
    # The timeout bounds the whole call: libcurl's QUIT at clean-up must not wait for the
    # server either.
    assert elapsed < 3.0


def test_slow_server_within_the_timeout_is_sent(smtp_server):
    server = smtp_server("slow", delay=0.3)
    status, result, _ = send(SIMPLE, server.url, "--timeout", "5000")
    assert status == 0, result
    assert len(server.wait_for(1)) == 1


def test_starttls_required_but_not_offered_is_permanent(smtp_server):
    server = smtp_server()
    status, result, _ = send(SIMPLE, server.url, "--starttls", "required")
    assert status == 2
    assert result["detail"] == (
        f"STARTTLS is required but the server does not offer it: {server.url}"
    )
    assert server.messages == []
    # opportunistic goes on in clear text.
    assert send(SIMPLE, server.url, "--starttls", "opportunistic")[0] == 0


@pytest.fixture(scope="module")
def self_signed_tls(tmp_path_factory):
    """A server-side SSLContext with a self-signed certificate for smtp.test."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is missing")
    base = tmp_path_factory.mktemp("tls")
    cert, key = base / "cert.pem", base / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=smtp.test", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def test_opportunistic_starttls_verifies_unless_told_not_to(smtp_server, self_signed_tls):
    # Offered STARTTLS is used, and its certificate verified like any other: a self-signed one
    # fails, and only --no-verify (squalld's [smtp] tls_verify = false) lets it through.
    server = smtp_server(tls_context=self_signed_tls)
    status, result, _ = send(SIMPLE, server.url, "--starttls", "opportunistic")
    assert status == 2, result
    assert result["detail"].startswith("TLS setup failed ("), result
    assert server.messages == []
    status, result, _ = send(SIMPLE, server.url, "--starttls", "opportunistic", "--no-verify")
    assert status == 0, result
    assert server.wait_for(1)[0].tls


def test_required_starttls_verifies_the_certificate(smtp_server, self_signed_tls):
    # A certificate that does not verify is a misconfiguration (or an attack): permanent.
    server = smtp_server(tls_context=self_signed_tls)
    status, result, _ = send(SIMPLE, server.url, "--starttls", "required")
    assert status == 2
    assert result["detail"].startswith("TLS setup failed (")
    assert result["detail"].endswith(f"): {server.url}")
    assert server.messages == []


def test_starttls_off_stays_in_clear_text(smtp_server, self_signed_tls):
    server = smtp_server(tls_context=self_signed_tls)
    status, result, _ = send(SIMPLE, server.url, "--starttls", "off")
    assert status == 0, result
    assert not server.wait_for(1)[0].tls


def test_login(smtp_server):
    server = smtp_server(auth=("mailer", PASSWORD))
    status, result, _ = send(SIMPLE, server.url, "--username", "mailer", password=PASSWORD)
    assert status == 0, result
    assert server.auth_attempts[-1][1:] == ("mailer", True)
    assert len(server.wait_for(1)) == 1


def test_login_denied_is_permanent_and_never_shows_the_password(smtp_server):
    server = smtp_server(auth=("mailer", PASSWORD))
    wrong = "wrong-" + PASSWORD
    status, result, _ = send(SIMPLE, server.url, "--username", "mailer", password=wrong)
    assert status == 2
    assert result["outcome"] == "permanent_failure"
    assert result["smtp_code"] == 535
    assert result["detail"].startswith("SMTP 535 ")
    assert "(AUTH " in result["detail"]
    assert PASSWORD not in json.dumps(result)
    assert server.auth_attempts[-1][1:] == ("mailer", False)


def test_rejected_request_is_not_sent(smtp_server):
    server = smtp_server()
    body = {"to": "a@example.com\r\nBcc: victim@example.com", "subject": "s", "text": "t"}
    proc = subprocess.run(
        [SEND_EMAIL, "--url", server.url],
        input=json.dumps(body).encode(),
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 3
    error = json.loads(proc.stdout)["error"]
    assert error["field"] == "to"
    assert "header injection" in error["message"]
    assert server.rcpt_attempts == []


def test_harness_wait_for_times_out():
    with SmtpServer() as server:
        started = time.monotonic()
        with pytest.raises(AssertionError, match="0 of 1 messages"):
            server.wait_for(1, timeout=0.2)
        assert time.monotonic() - started < 2


# --------------------------------------------------------------------------------------------
# Kept connections: one SmtpMailer sends one message after another over the same connection.


def test_messages_share_one_connection(smtp_server):
    server = smtp_server()
    status, result, _ = send(SIMPLE, server.url, "--repeat", "5", "--connections", "1")
    assert status == 0, result
    assert result["sends"] == ["sent"] * 5
    assert len(server.wait_for(5)) == 5
    assert result["connections_opened"] == 1
    assert len(server.sessions) == 1
    assert server.sessions[0].messages == 5
    # The mailer's end closes the kept connection politely.
    [session] = server.wait_sessions_closed(1)
    assert session.quit


def test_kept_connection_keeps_starttls_and_login(smtp_server, self_signed_tls):
    # The messages after the first go over the same encrypted, logged-in connection: TLS and
    # AUTH happen once, and no message goes out in clear text.
    server = smtp_server(tls_context=self_signed_tls, auth=("mailer", PASSWORD))
    status, result, _ = send(SIMPLE, server.url, "--repeat", "3", "--starttls", "required",
                             "--no-verify", "--username", "mailer", password=PASSWORD)
    assert status == 0, result
    assert result["sends"] == ["sent"] * 3
    messages = server.wait_for(3)
    assert all(message.tls for message in messages)
    assert [attempt[1:] for attempt in server.auth_attempts] == [("mailer", True)]
    assert result["connections_opened"] == 1
    assert len(server.sessions) == 1


def test_unverified_certificate_fails_on_every_send(smtp_server, self_signed_tls):
    # A failed TLS setup is never kept: each send tries (and fails) anew.
    server = smtp_server(tls_context=self_signed_tls)
    status, result, _ = send(SIMPLE, server.url, "--repeat", "2", "--starttls", "required")
    assert status == 2, result
    assert result["sends"] == ["permanent_failure"] * 2
    assert result["detail"].startswith("TLS setup failed (")
    assert result["connections_opened"] == 2
    assert server.messages == []


def test_failed_transaction_closes_its_connection(smtp_server):
    # A refused recipient ends the connection (QUIT): the next message gets a fresh one, so no
    # transaction is ever continued on a connection where one failed.
    server = smtp_server(mode="tempfail", fail_recipients={"rcpt@example.com"})
    status, result, _ = send(SIMPLE, server.url, "--repeat", "2", "--connections", "1")
    assert status == 1, result
    assert result["sends"] == ["temporary_failure"] * 2
    assert result["connections_opened"] == 2
    sessions = server.wait_sessions_closed(2)
    assert [session.quit for session in sessions] == [True, True]


def test_relay_closing_between_messages_gets_a_new_connection(smtp_server):
    server = smtp_server(drop="after_message")
    status, result, _ = send(SIMPLE, server.url, "--repeat", "4", "--connections", "1")
    assert status == 0, result
    assert result["sends"] == ["sent"] * 4
    assert len(server.wait_for(4)) == 4
    assert result["connections_opened"] == 4
    assert [session.messages for session in server.sessions] == [1, 1, 1, 1]


def test_kept_connection_cut_at_mail_from_is_replaced_at_once(smtp_server):
    # The relay cuts the kept connection when the next MAIL FROM arrives, as when it closed it
    # just before: no byte of the message went out, so the send goes over a new connection in
    # the same attempt, and every message arrives once.
    server = smtp_server(drop="second_mail")
    status, result, _ = send(SIMPLE, server.url, "--repeat", "3", "--connections", "1")
    assert status == 0, result
    assert result["sends"] == ["sent"] * 3
    assert len(server.wait_for(3)) == 3
    assert [session.messages for session in server.sessions] == [1, 1, 1]
    assert [session.mails for session in server.sessions] == [2, 2, 1]


def test_cut_at_end_of_data_is_a_temporary_failure_and_not_resent(smtp_server):
    # The message went out; whether the relay took it is unknown: the send fails (the job is
    # retried later, with the same Message-ID) instead of being repeated at once.
    server = smtp_server(drop="data", drop_count=1)
    status, result, _ = send(SIMPLE, server.url, "--repeat", "2", "--connections", "1")
    assert status == 0, result
    assert result["sends"] == ["temporary_failure", "sent"]
    assert len(server.wait_for(1)) == 1
    assert server.data_ends == 2
    assert [session.messages for session in server.sessions] == [0, 1]

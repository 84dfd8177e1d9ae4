"""SmtpMailer's own mail transaction, seen byte for byte by a relay written here on raw sockets:
with PIPELINING (RFC 2920) MAIL FROM, every RCPT TO and DATA leave in one write and the message
with its final dot in another; without it one command at a time. A refused recipient delivers
nothing even when DATA was already answered 354, replies may be multi-line and cut anywhere, and
a kept connection answered 421 is replaced at once. build/examples/send_email is the client."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from test_mailer import SEND_EMAIL, SIMPLE, self_signed_tls, send  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(
    not os.access(SEND_EMAIL, os.X_OK), reason=f"{SEND_EMAIL} is missing: run `make examples`"
)


@dataclass(eq=False)
class Session:
    """One connection as the relay saw it."""

    segments: list = field(default_factory=list)  # each recv()'s bytes, in order
    # (command line, replies written before it arrived), greeting and EHLO's included
    commands: list = field(default_factory=list)
    messages: list = field(default_factory=list)  # each message's bytes as sent, final dot included
    in_data: bool = False  # after a 354, before the final dot
    tls: bool = False  # after STARTTLS
    quit: bool = False
    closed: bool = False


class RawRelay:
    """A relay on 127.0.0.1:0, one thread per connection. It answers every complete command
    line it has, then writes the replies together (as a pipelining server does).

    pipelining: EHLO offers PIPELINING. refuse: {address: reply} for RCPT TO. multiline: the
    replies to MAIL, RCPT and the message have two lines. split: replies are written a few bytes
    at a time. close_on_second_mail: a second MAIL FROM on a connection gets 421 and the close.
    tls_context: STARTTLS is offered, and PIPELINING before it only if pipelining_before_tls."""

    def __init__(self, *, pipelining=True, refuse=None, multiline=False, split=False,
                 close_on_second_mail=False, tls_context=None, pipelining_before_tls=False):
        self.pipelining = pipelining
        self.tls_context = tls_context
        self.pipelining_before_tls = pipelining_before_tls
        self.refuse = refuse or {}
        self.multiline = multiline
        self.split = split
        self.close_on_second_mail = close_on_second_mail
        self.sessions: list[Session] = []
        self._cond = threading.Condition()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"smtp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            session = Session()
            with self._cond:
                self.sessions.append(session)
            thread = threading.Thread(target=self._serve, args=(conn, session), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _reply(self, code: str, first: str, second: str) -> bytes:
        if self.multiline:
            return f"{code}-{first}\r\n{code} {second}\r\n".encode()
        return f"{code} {second}\r\n".encode()

    def _write(self, conn, data: bytes):
        if not self.split:
            conn.sendall(data)
            return
        for at in range(0, len(data), 3):
            conn.sendall(data[at:at + 3])
            time.sleep(0.002)  # lets each piece leave on its own

    def _serve(self, conn, session: Session):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = 0
        pending = []  # replies to the command lines taken so far, not yet written
        buffer = b""
        mails = 0
        accepted = 0
        try:
            self._write(conn, b"220 relay.test ESMTP\r\n")
            replies = 1
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                with self._cond:
                    session.segments.append(chunk)
                buffer += chunk
                while True:
                    if session.in_data:
                        end = (b"\r\n" + buffer).find(b"\r\n.\r\n")
                        if end < 0:
                            break
                        with self._cond:
                            session.messages.append(buffer[:end + 3])
                            session.in_data = False
                            self._cond.notify_all()
                        buffer = buffer[end + 3:]
                        pending.append(self._reply("250", "2.0.0 first line", "2.0.0 queued"))
                        continue
                    line_end = buffer.find(b"\r\n")
                    if line_end < 0:
                        break
                    line, buffer = buffer[:line_end].decode(), buffer[line_end + 2:]
                    with self._cond:
                        session.commands.append((line, replies))
                    verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
                    if verb == "EHLO":
                        offer = self.pipelining
                        caps = ["relay.test", "8BITMIME"]
                        if self.tls_context is not None and not session.tls:
                            offer = self.pipelining_before_tls
                            caps.append("STARTTLS")
                        caps += (["PIPELINING"] if offer else []) + ["SIZE 10000000"]
                        pending.append("".join(f"250-{c}\r\n" for c in caps[:-1]).encode()
                                       + f"250 {caps[-1]}\r\n".encode())
                    elif verb == "MAIL":
                        mails += 1
                        accepted = 0
                        if self.close_on_second_mail and mails >= 2:
                            self._write(conn, b"".join(pending) + b"421 4.4.2 closing for testing\r\n")
                            return
                        pending.append(self._reply("250", "2.1.0 first line", "2.1.0 sender ok"))
                    elif verb == "RCPT":
                        address = line[line.index("<") + 1:line.rindex(">")]
                        if address in self.refuse:
                            code, text = self.refuse[address].split(" ", 1)
                            pending.append(self._reply(code, "refused here", text))
                        else:
                            accepted += 1
                            pending.append(self._reply("250", "2.1.5 first line", "2.1.5 ok"))
                    elif verb == "DATA":
                        if accepted:
                            pending.append(b"354 go ahead\r\n")
                            with self._cond:
                                session.in_data = True
                        else:
                            pending.append(b"554 5.5.1 no valid recipients\r\n")
                    elif verb == "STARTTLS" and self.tls_context is not None:
                        self._write(conn, b"".join(pending) + b"220 2.0.0 ready\r\n")
                        replies += len(pending) + 1
                        pending = []
                        conn = self.tls_context.wrap_socket(conn, server_side=True)
                        with self._cond:
                            session.tls = True
                    elif verb == "QUIT":
                        with self._cond:
                            session.quit = True
                        self._write(conn, b"".join(pending) + b"221 2.0.0 bye\r\n")
                        return
                    else:
                        pending.append(b"250 2.0.0 ok\r\n")
                if pending:
                    replies += len(pending)
                    self._write(conn, b"".join(pending))
                    pending = []
        except OSError:
            pass
        finally:
            conn.close()
            with self._cond:
                session.closed = True
                self._cond.notify_all()

    def wait_closed(self, count: int, timeout: float = 10.0) -> list[Session]:
        with self._cond:
            if not self._cond.wait_for(lambda: sum(s.closed for s in self.sessions) >= count,
                                       timeout):
                raise AssertionError(f"{self.sessions} within {timeout} s")
            return list(self.sessions)

    def stop(self):
        self._listener.close()


@pytest.fixture
def relay():
    relays = []

    def start(**kwargs) -> RawRelay:
        relays.append(RawRelay(**kwargs))
        return relays[-1]

    yield start
    for started in relays:
        started.stop()


THREE = {**SIMPLE, "to": ["first@example.com", "second@example.com"], "cc": "third@example.com"}
ENVELOPE = [b"MAIL FROM:<squall@example.com> SIZE=n\r\n", b"RCPT TO:<first@example.com>\r\n",
            b"RCPT TO:<second@example.com>\r\n", b"RCPT TO:<third@example.com>\r\n",
            b"DATA\r\n"]


def after_ehlo(session: Session) -> list[bytes]:
    """The segments after the one that carried the last EHLO, MAIL FROM's SIZE=<digits> as
    SIZE=n."""
    ehlo = max(i for i, s in enumerate(session.segments) if s.startswith(b"EHLO "))
    return [re.sub(rb"^(MAIL FROM:<[^>]*> SIZE=)[0-9]+", rb"\1n", s)
            for s in session.segments[ehlo + 1:]]


def test_pipelined_envelope_goes_in_one_write_and_the_message_in_another(relay):
    server = relay(pipelining=True)
    status, result, _ = send(THREE, server.url)
    assert status == 0, result
    assert result["detail"] == "SMTP 250 2.0.0 queued"
    [session] = server.wait_closed(1)
    segments = after_ehlo(session)
    assert segments[0] == b"".join(ENVELOPE)
    # The message and its final dot: one write, nothing before DATA's 354 came back.
    assert segments[1] == session.messages[0]
    assert segments[1].endswith(b"\r\n.\r\n")
    assert segments[2] == b"QUIT\r\n"
    assert session.quit
    # Every command of the envelope arrived before the relay had answered any of them.
    waits = [replies for line, replies in session.commands if not line.startswith(("EHLO", "QUIT"))]
    assert waits == [2] * 5
    # SIZE (offered) is the message's size before dot-stuffing, as libcurl gives it.
    mail_from = session.commands[1][0]
    assert mail_from == f"MAIL FROM:<squall@example.com> SIZE={len(session.messages[0]) - 3}"


def test_without_pipelining_each_command_awaits_its_reply(relay):
    server = relay(pipelining=False)
    status, result, _ = send(THREE, server.url)
    assert status == 0, result
    [session] = server.wait_closed(1)
    segments = after_ehlo(session)
    assert segments[:5] == ENVELOPE
    replies_before = [replies for _, replies in session.commands]
    # greeting, EHLO, MAIL, 3 x RCPT, DATA, then QUIT after the message's reply
    assert replies_before == [1, 2, 3, 4, 5, 6, 8]


def test_refused_recipient_after_pipelined_354_delivers_nothing(relay):
    # DATA is answered 354 (two recipients were accepted) although the second was refused: the
    # relay waits for the message, which must not come (no retry may give the accepted ones a
    # second copy), nor a lone dot (an empty message): the connection is cut instead.
    server = relay(refuse={"second@example.com": "550 5.1.1 no such user"})
    status, result, _ = send(THREE, server.url)
    assert status == 2, result
    assert result["outcome"] == "permanent_failure"
    assert result["smtp_code"] == 550
    assert result["detail"] == (
        "SMTP 550 5.1.1 no such user (RCPT TO:<second@example.com>)")
    [session] = server.wait_closed(1)
    assert after_ehlo(session) == [b"".join(ENVELOPE)]  # nothing after DATA
    assert session.in_data and session.messages == [] and not session.quit


def test_refused_recipients_and_refused_data_end_with_quit(relay):
    # Every recipient refused: DATA gets 554, the relay is not inside a message, and the first
    # refusal is what the send reports; the connection ends politely.
    server = relay(refuse={"rcpt@example.com": "450 4.2.1 mailbox busy"})
    status, result, _ = send(SIMPLE, server.url)
    assert status == 1, result
    assert result["detail"] == "SMTP 450 4.2.1 mailbox busy (RCPT TO:<rcpt@example.com>)"
    [session] = server.wait_closed(1)
    segments = after_ehlo(session)
    assert segments[0] == (b"MAIL FROM:<squall@example.com> SIZE=n\r\nRCPT TO:<rcpt@example.com>\r\n"
                           b"DATA\r\n")
    assert segments[1:] == [b"QUIT\r\n"] and session.quit
    assert session.messages == []


@pytest.mark.parametrize("pipelining", [True, False])
def test_multi_line_replies_cut_anywhere(relay, pipelining):
    server = relay(pipelining=pipelining, multiline=True, split=True,
                   refuse={"third@example.com": "451 4.3.0 try later"})
    status, result, _ = send({**SIMPLE, "to": ["first@example.com"]}, server.url, "--repeat", "2",
                             "--connections", "1")
    assert status == 0, result
    assert result["sends"] == ["sent", "sent"]
    assert result["detail"] == "SMTP 250 2.0.0 first line 2.0.0 queued"
    assert result["connections_opened"] == 1
    status, result, _ = send(THREE, server.url)
    assert status == 1, result
    assert result["detail"] == (
        "SMTP 451 refused here 4.3.0 try later (RCPT TO:<third@example.com>)")
    sessions = server.wait_closed(2)
    assert [len(s.messages) for s in sessions] == [2, 0]
    envelopes = [s for s in after_ehlo(sessions[0]) if s.startswith(b"MAIL")]
    # MAIL, RCPT, DATA: together when pipelined, else each on its own
    assert [e.count(b"\r\n") for e in envelopes] == ([3, 3] if pipelining else [1, 1])


def test_dot_leading_lines_are_doubled_on_the_wire(relay):
    server = relay()
    body = {**SIMPLE, "text": ".\n.leading dot\n..two dots\nlast"}
    status, result, _ = send(body, server.url)
    assert status == 0, result
    [session] = server.wait_closed(1)
    [raw] = session.messages
    assert b"\r\n..\r\n..leading dot\r\n...two dots\r\nlast" in raw
    assert raw.endswith(b"\r\n.\r\n") and not raw.endswith(b"\r\n\r\n.\r\n")


def test_kept_connection_answered_421_is_replaced_at_once(relay):
    # The relay answers the second MAIL FROM on a connection with 421 and closes it, as one
    # that timed the idle connection out would: no byte of the message went out, so each send
    # goes over a new connection in the same call, and each message arrives once.
    server = relay(close_on_second_mail=True)
    status, result, _ = send(SIMPLE, server.url, "--repeat", "3", "--connections", "1")
    assert status == 0, result
    assert result["sends"] == ["sent"] * 3
    assert result["connections_opened"] == 3
    sessions = server.wait_closed(3)
    assert [len(s.messages) for s in sessions] == [1, 1, 1]


@pytest.mark.parametrize("before, after", [(True, False), (False, True)])
def test_the_ehlo_after_starttls_decides(relay, self_signed_tls, before, after):
    # After STARTTLS the client says EHLO again and only that reply's extensions count.
    server = relay(tls_context=self_signed_tls, pipelining_before_tls=before, pipelining=after)
    status, result, _ = send(THREE, server.url, "--starttls", "required", "--no-verify")
    assert status == 0, result
    [session] = server.wait_closed(1)
    assert session.tls and len(session.messages) == 1
    segments = after_ehlo(session)
    assert segments[:5 if not after else 1] == ([b"".join(ENVELOPE)] if after else ENVELOPE)

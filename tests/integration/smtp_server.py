"""An SMTP server for tests: aiosmtpd on 127.0.0.1 and a free port, in a background thread.

    server = SmtpServer(mode="accept")       # or "slow", "hold_data", "tempfail", "permfail"
    server.start()
    ... send to smtp://127.0.0.1:{server.port} ...
    [message] = server.wait_for(1)           # Message(mail_from, rcpt_tos, content)
    server.stop()

Modes: "accept" takes everything; "slow" waits `delay` seconds before its reply to the message
(after the final dot: a client that dies meanwhile cannot stop the relay from keeping the
message, RFC 1047); "hold_data" holds every DATA command before its 354 reply until
release_data() (the message is not complete while held, so a client that dies meanwhile leaves
nothing behind; wait_data_held(n) awaits the n-th held DATA); "tempfail" answers 451 and "permfail" 550, to RCPT (fail_at="rcpt", for every
recipient or only those in fail_recipients) or to the message (fail_at="data").
auth=("user", "password") requires AUTH (PLAIN or LOGIN, allowed without TLS).
tls_context=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) with a certificate loaded offers STARTTLS.

Every connection is a Session in `server.sessions` (messages taken, QUIT seen, closed);
wait_sessions_closed(n) awaits the n-th close. drop= makes it cut connections like a failing
relay: "after_message" closes each connection right after its 250 to a message (a relay that
drops idle connections), "second_mail" cuts a connection without a reply when a second MAIL
FROM arrives on it (a kept connection the relay closed just before it was reused), "data" cuts
the connection instead of answering the end of DATA (a failure mid-DATA) for the first
`drop_count` messages, which are then not taken. hang_on_quit=True never answers QUIT.

In pytest, import the `smtp_server` fixture into a test module (it is not in conftest.py):
    from smtp_server import smtp_server  # noqa: F401
    def test_x(smtp_server):
        server = smtp_server(mode="tempfail")   # started; stopped at teardown

Standard library and aiosmtpd only (pytest is used when present, for the fixture).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import threading
import time
import warnings
from dataclasses import dataclass

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

MODES = ("accept", "slow", "hold_data", "tempfail", "permfail")
DROPS = (None, "after_message", "second_mail", "data")
TEMPFAIL_REPLY = "451 4.3.0 try again later"
PERMFAIL_REPLY = "550 5.7.1 rejected for testing"


@dataclass
class Message:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: list
    content: bytes  # as received, dot-unstuffed, CRLF line ends
    tls: bool = False  # it came after STARTTLS
    taken_at: float = 0.0  # time.time() as the server took it, right before its 250 reply

    def parsed(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.content, policy=email.policy.default)


@dataclass(eq=False)  # each one is itself: two fresh sessions are not "equal"
class Session:
    """One SMTP connection, as the server saw it."""

    messages: int = 0  # messages taken (250 to the end of DATA)
    mails: int = 0  # MAIL FROM commands received
    quit: bool = False  # the client sent QUIT
    closed: bool = False  # the connection is gone


class _SessionSMTP(SMTP):
    """aiosmtpd's SMTP, telling the server about its connection's life (aiosmtpd 1.4)."""

    def __init__(self, server: "SmtpServer", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._test_server = server
        self._test_session = Session()

    def connection_made(self, transport):
        # aiosmtpd calls it again after STARTTLS: still the same session.
        with self._test_server._cond:
            if not any(s is self._test_session for s in self._test_server.sessions):
                self._test_server.sessions.append(self._test_session)
                self._test_server._cond.notify_all()
        super().connection_made(transport)

    def connection_lost(self, error):
        with self._test_server._cond:
            self._test_session.closed = True
            self._test_server._cond.notify_all()
        super().connection_lost(error)

    async def smtp_MAIL(self, arg):
        server = self._test_server
        with server._cond:
            self._test_session.mails += 1
            mails = self._test_session.mails
        if server.drop == "second_mail" and mails >= 2:
            self.transport.close()
            return
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg):
        server = self._test_server
        if server.mode == "hold_data":
            with server._cond:
                server.data_held += 1
                server._cond.notify_all()
            # Cancelled with the whole command if the client goes away meanwhile (aiosmtpd
            # cancels its handler on EOF or a lost connection): no message is taken then.
            await server._released.wait()
        await super().smtp_DATA(arg)

    async def smtp_QUIT(self, arg):
        with self._test_server._cond:
            self._test_session.quit = True
            self._test_server._cond.notify_all()
        if self._test_server.hang_on_quit:
            await asyncio.sleep(3600)  # never answers; cancelled by stop()
        await super().smtp_QUIT(arg)


class _Handler:
    def __init__(self, server: "SmtpServer"):
        self.server = server

    async def handle_RCPT(self, smtp, session, envelope, address, rcpt_options):
        server = self.server
        with server._cond:
            server.rcpt_attempts.append(address)
        if (
            server.mode in ("tempfail", "permfail")
            and server.fail_at == "rcpt"
            and (server.fail_recipients is None or address in server.fail_recipients)
        ):
            return server._failure_reply()
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, smtp, session, envelope):
        server = self.server
        if server.mode == "slow":
            await asyncio.sleep(server.delay)
        if server.mode in ("tempfail", "permfail") and server.fail_at == "data":
            return server._failure_reply()
        if server.drop == "data":
            with server._cond:
                server.data_ends += 1
                drop = server.data_ends <= server.drop_count
            if drop:
                smtp.transport.close()  # the reply below is never written
                return "421 4.4.2 dropped for testing"
        message = Message(
            envelope.mail_from,
            list(envelope.rcpt_tos),
            bytes(envelope.content),
            tls=smtp._tls_protocol is not None,
            taken_at=time.time(),
        )
        with server._cond:
            server.messages.append(message)
            number = len(server.messages)
            smtp._test_session.messages += 1
            server._cond.notify_all()
        if server.drop == "after_message":
            # After the 250 below is written: aiosmtpd writes it before it next awaits.
            asyncio.get_running_loop().call_soon(smtp.transport.close)
        return f"250 2.0.0 OK: queued as test-{number}"


class SmtpServer:
    def __init__(
        self,
        mode: str = "accept",
        delay: float = 0.0,
        *,
        fail_at: str = "rcpt",
        fail_recipients=None,
        auth: tuple | None = None,
        tls_context=None,
        hostname: str = "smtp.test",
        drop: str | None = None,
        drop_count: int = 1,
        hang_on_quit: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if drop not in DROPS:
            raise ValueError(f"drop must be one of {DROPS}, not {drop!r}")
        if fail_at not in ("rcpt", "data"):
            raise ValueError(f"fail_at must be 'rcpt' or 'data', not {fail_at!r}")
        self.mode = mode
        self.delay = delay
        self.fail_at = fail_at
        self.fail_recipients = set(fail_recipients) if fail_recipients is not None else None
        self.auth = auth
        self.tls_context = tls_context
        self.hostname = hostname
        self.drop = drop
        self.drop_count = drop_count
        self.hang_on_quit = hang_on_quit
        self.data_ends = 0  # ends of DATA seen with drop="data", dropped or not
        self.data_held = 0  # DATA commands held before their 354 (mode "hold_data")
        self._released: asyncio.Event | None = None  # opened by release_data()
        self.sessions: list[Session] = []
        self.port: int | None = None
        self.messages: list[Message] = []
        self.rcpt_attempts: list[str] = []  # every RCPT TO address, refused ones included
        self.auth_attempts: list[tuple] = []  # (mechanism, login, success)
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self._protocols: list[SMTP] = []

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def _failure_reply(self) -> str:
        return TEMPFAIL_REPLY if self.mode == "tempfail" else PERMFAIL_REPLY

    def _authenticate(self, smtp, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.auth is not None
            and auth_data.login.decode() == self.auth[0]
            and auth_data.password.decode() == self.auth[1]
        )
        login = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else None
        with self._cond:
            self.auth_attempts.append((mechanism, login, ok))
        # handled=False: aiosmtpd itself answers a failure (535), which is what servers do.
        return AuthResult(success=ok, handled=False if not ok else True)

    def _protocol(self) -> SMTP:
        kwargs = {}
        if self.auth is not None:
            kwargs.update(
                authenticator=self._authenticate, auth_required=True, auth_require_tls=False
            )
        if self.tls_context is not None:
            kwargs.update(tls_context=self.tls_context)
        with warnings.catch_warnings():
            # "Requiring AUTH while not requiring TLS": deliberate, on 127.0.0.1.
            warnings.simplefilter("ignore", UserWarning)
            protocol = _SessionSMTP(
                self, _Handler(self), hostname=self.hostname, loop=self._loop, **kwargs
            )
        self._protocols.append(protocol)
        return protocol

    def start(self) -> "SmtpServer":
        # aiosmtpd's Controller probes its port after starting, which does not work with port 0;
        # a server made with create_server reports the port the kernel chose.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"smtp-{self.mode}", daemon=True
        )
        self._thread.start()
        self._released = asyncio.Event()  # bound to the loop that first waits on it
        future = asyncio.run_coroutine_threadsafe(
            self._loop.create_server(self._protocol, "127.0.0.1", 0), self._loop
        )
        self._server = future.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def release_data(self) -> None:
        """Mode "hold_data": lets every held DATA command, and every later one, go on."""
        self._loop.call_soon_threadsafe(self._released.set)

    def wait_data_held(self, count: int = 1, timeout: float = 10.0) -> int:
        """Mode "hold_data": waits until `count` DATA commands have been held in all."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.data_held >= count, timeout):
                raise AssertionError(f"{self.data_held} of {count} DATA commands held within "
                                     f"{timeout} s")
            return self.data_held

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[Message]:
        """The first `count` messages, once they arrived; AssertionError after `timeout`."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(
                    f"{len(self.messages)} of {count} messages arrived within {timeout} s"
                )
            return list(self.messages[:count])

    def wait_sessions_closed(self, count: int = 1, timeout: float = 10.0) -> list[Session]:
        """The sessions once `count` of them are closed; AssertionError after `timeout`."""
        with self._cond:
            closed = lambda: sum(session.closed for session in self.sessions) >= count  # noqa
            if not self._cond.wait_for(closed, timeout):
                raise AssertionError(
                    f"{sum(s.closed for s in self.sessions)} of {count} sessions closed within "
                    f"{timeout} s"
                )
            return list(self.sessions)

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown():
            self._server.close()
            for protocol in self._protocols:
                if protocol.transport is not None:
                    protocol.transport.close()
            current = asyncio.current_task()
            tasks = [task for task in asyncio.all_tasks() if task is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> "SmtpServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connecting to it is refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


try:
    import pytest
except ImportError:  # the harness itself needs no pytest
    pytest = None


def started_servers(server_class=None):
    """A generator for fixtures: yields start(mode="accept", delay=0.0, **kwargs), which makes
    and starts a server_class (SmtpServer by default), and stops every one at teardown."""
    server_class = server_class or SmtpServer
    servers = []

    def start(mode: str = "accept", delay: float = 0.0, **kwargs):
        server = server_class(mode, delay, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


if pytest is not None:

    @pytest.fixture
    def smtp_server():
        """A factory: smtp_server(mode="accept", delay=0.0, **kwargs) -> a started SmtpServer,
        stopped at teardown."""
        yield from started_servers()

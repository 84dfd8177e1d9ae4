"""Helpers for squalld's integration tests: a process harness, raw sockets, an HTTP/1.1
response parser and a curl wrapper. Standard library only."""

from __future__ import annotations

import email.utils
import errno
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

CRLF = b"\r\n"
REPO = Path(__file__).resolve().parents[2]
# A request appended after a malformed one: if the server ever parses it, a second response shows.
FOLLOW = b"GET /plaintext HTTP/1.1\r\nHost: a\r\n\r\n"


def squalld_path() -> str:
    return os.environ.get("SQUALLD") or str(REPO / "build" / "squalld")


def examples_dir() -> Path:
    """The example programs: $EXAMPLES_DIR, else the examples/ directory beside $SQUALLD."""
    if os.environ.get("EXAMPLES_DIR"):
        return Path(os.environ["EXAMPLES_DIR"])
    return Path(squalld_path()).resolve().parent / "examples"


# --------------------------------------------------------------------------------------------
# Config rendering


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes.
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def render_toml(tables: dict) -> str:
    out = []
    for table, keys in tables.items():
        out.append(f"[{table}]")
        for key, value in keys.items():
            if value is not None:
                out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def merge_config(base: dict, overrides: dict | None) -> dict:
    merged = {table: dict(keys) for table, keys in base.items()}
    for table, keys in (overrides or {}).items():
        merged.setdefault(table, {})
        for key, value in keys.items():
            if value is None:
                merged[table].pop(key, None)
            else:
                merged[table][key] = value
    return merged


# --------------------------------------------------------------------------------------------
# The daemon

LISTENING_RE = re.compile(r"listening on (\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):(\d+)\b")
# Error-level log lines: spdlog's "[error]"/"[critical]" level field, or an upper-case ERROR word.
# An error-level line: spdlog's [error]/[critical], or journald's <0>..<3> priority prefix.
ERROR_LINE_RE = re.compile(
    r"(?i:\[(?:error|err|critical|crit)\])|\bERROR\b|\bCRITICAL\b|^<[0-3]>")


class ServerError(AssertionError):
    pass


class Squalld:
    """One squalld process with a temporary config. start() waits for its 'listening on' line."""

    def __init__(self, workdir: Path, config: dict | None = None, args=(), name="squalld",
                 allow_errors=False, with_port_file=True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.access_log = self.workdir / "access.log"
        self.config_path = self.workdir / "squalld.toml"
        self.write_config(config)
        self.port_file = self.workdir / "port" if with_port_file else None
        self.args = list(args)
        self.allow_errors = allow_errors
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader: threading.Thread | None = None
        self.addresses: list[tuple[str, int]] = []
        self.returncode: int | None = None

    def base_config(self) -> dict:
        """The tables every config starts from; a test's own tables are merged over them.
        SQUALL_TEST_WORKERS=N runs every daemon with [server] workers = N (the whole suite
        against several event loops)."""
        server = {"listen": ["127.0.0.1:0"]}
        if os.environ.get("SQUALL_TEST_WORKERS"):
            server["workers"] = int(os.environ["SQUALL_TEST_WORKERS"])
        return {
            "server": server,
            "log": {"level": "info", "error_log": "stderr", "access_log": str(self.access_log)},
            # Shorter than the stop timeout, so a connection left stuck by a failed test does
            # not turn every later teardown into an error too.
            "timeouts": {"drain": "5s"},
        }

    def write_config(self, config: dict | None = None, text: str | None = None):
        """Writes the config file atomically (a reload may read it at any moment): the test's
        tables merged over base_config(), or raw text."""
        if text is None:
            self.config = merge_config(self.base_config(), config)
            text = render_toml(self.config)
        temporary = self.config_path.with_suffix(".tmp")
        temporary.write_text(text)
        os.replace(temporary, self.config_path)

    # -- process ---------------------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [squalld_path(), "--config", str(self.config_path)]
        if self.port_file is not None:
            cmd += ["--port-file", str(self.port_file)]
        return cmd + self.args

    def start(self, timeout=10.0, listeners=1):
        exe = squalld_path()
        if not os.access(exe, os.X_OK):
            raise ServerError(f"squalld not found at {exe} (set SQUALLD or run make build/squalld)")
        self.stdout_path = self.workdir / "stdout.txt"
        with open(self.stdout_path, "wb") as stdout:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=stdout,
                                         stderr=subprocess.PIPE, cwd=self.workdir)
        self._reader = threading.Thread(target=self._read_stderr, args=(self.proc.stderr,),
                                        daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        index = 0
        while len(self.addresses) < listeners:
            line, index = self.wait_for_line(LISTENING_RE, deadline - time.monotonic(), start=index)
            m = LISTENING_RE.search(line)
            host = m.group(1).strip("[]")
            self.addresses.append((host, int(m.group(2))))
            index += 1
        return self

    def _read_stderr(self, stream):
        with stream:
            for raw_line in stream:
                with self._cond:
                    self.lines.append(raw_line.decode("utf-8", "replace").rstrip("\r\n"))
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for_line(self, pattern, timeout=5.0, start=0):
        """Waits for a stderr line (index >= start) matching a regex or containing a string.
        Returns (line, index)."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + max(timeout, 0)
        with self._cond:
            while True:
                for i in range(start, len(self.lines)):
                    if regex.search(self.lines[i]):
                        return self.lines[i], i
                start = max(start, len(self.lines))
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    break
                self._cond.wait(remaining)
        # Let the reader catch up with a process that has exited, for the message.
        self.poll()
        raise ServerError(f"{self.name}: no stderr line matching {regex.pattern!r} within "
                          f"{timeout:.1f}s (exit code {self.returncode})\n" + self.stderr_text())

    def line_count(self) -> int:
        with self._cond:
            return len(self.lines)

    def stderr_text(self) -> str:
        with self._cond:
            lines = list(self.lines)
        return f"--- {self.name} stderr ---\n" + "\n".join(lines) + "\n--- end ---"

    def error_lines(self) -> list[str]:
        with self._cond:
            return [line for line in self.lines if ERROR_LINE_RE.search(line)]

    def poll(self):
        if self.proc is not None and self.returncode is None:
            self.returncode = self.proc.poll()
        return self.returncode

    def running(self) -> bool:
        return self.proc is not None and self.poll() is None

    def signal(self, sig):
        assert self.proc is not None
        if self.poll() is None:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout=10.0) -> int:
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ServerError(f"{self.name} did not exit within {timeout}s\n" + self.stderr_text())
        if self._reader is not None:
            self._reader.join(5)
        return self.returncode

    def stop(self, expect_rc=0, timeout=10.0, check_errors=True):
        """SIGTERM, wait for exit, check the exit code and that stderr shows no ERROR lines."""
        if self.proc is None:
            return None
        try:
            if self.poll() is None:
                self.signal(signal.SIGTERM)
            rc = self.wait_exit(timeout)
        finally:
            self.kill()
        if expect_rc is not None and rc != expect_rc:
            raise ServerError(f"{self.name} exited with {rc}, expected {expect_rc}\n"
                              + self.stderr_text())
        if check_errors and not self.allow_errors:
            errors = self.error_lines()
            if errors:
                raise ServerError(f"{self.name} logged error lines:\n" + "\n".join(errors)
                                  + "\n" + self.stderr_text())
        return rc

    def kill(self):
        """Ends the process if it still runs (our own child, by its pid), stopped or not."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(5)
        if self.proc is not None:
            self.returncode = self.proc.returncode
            if self.proc.stderr is not None and self._reader is not None:
                self._reader.join(5)

    # -- addresses -------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.addresses[0][0]

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    def url(self, path="/") -> str:
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}{path}"

    # -- conveniences ----------------------------------------------------------------------

    def conn(self, **kwargs) -> "Conn":
        return Conn(self.port, host=self.host, **kwargs)

    def get(self, target, headers=(), timeout=5.0) -> "Response":
        """One request on a fresh connection that is closed afterwards."""
        with self.conn(timeout=timeout) as c:
            c.send(request("GET", target, headers=headers))
            return c.read_response()

    def metrics(self) -> "Metrics":
        response = self.get("/metrics")
        assert response.status == 200, response
        return Metrics(response.body.decode())

    def access_lines(self) -> list[str]:
        if not self.access_log.exists():
            return []
        return [line for line in self.access_log.read_text().splitlines() if line.strip()]

    def wait_access_line(self, predicate, timeout=5.0, path=None) -> str:
        """Access logging is asynchronous: polls the file (bounded) for a matching line."""
        path = Path(path) if path is not None else self.access_log
        deadline = time.monotonic() + timeout
        while True:
            lines = path.read_text().splitlines() if path.exists() else []
            for line in lines:
                if predicate(line):
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching line in {path} within {timeout}s; it has:\n"
                                     + "\n".join(lines[-20:]))
            time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# Requests and responses


def request(method, target, headers=(), body=b"", version="HTTP/1.1", host="a",
            content_length=None) -> bytes:
    """Builds request bytes. Host is added unless host is None; Content-Length is added when
    there is a body (or content_length is given) and no Transfer-Encoding header."""
    if isinstance(body, str):
        body = body.encode()
    lines = [f"{method} {target} {version}".encode()]
    names = {name.lower() for name, _ in headers}
    if host is not None and "host" not in names:
        lines.append(b"Host: " + host.encode())
    for name, value in headers:
        lines.append(f"{name}: {value}".encode("latin-1"))
    if "content-length" not in names and "transfer-encoding" not in names:
        if content_length is not None:
            lines.append(f"Content-Length: {content_length}".encode())
        elif body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}".encode())
    return CRLF.join(lines) + CRLF + CRLF + body


def chunked(*chunks, trailers=b"") -> bytes:
    out = b""
    for chunk in chunks:
        if isinstance(chunk, str):
            chunk = chunk.encode()
        out += f"{len(chunk):x}".encode() + CRLF + chunk + CRLF
    return out + b"0" + CRLF + trailers + CRLF


class Response:
    def __init__(self, version, status, reason, headers, body, raw):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers  # [(name, value)] in order, as str
        self.body = body
        self.raw = raw
        self.chunked = False

    def get_all(self, name) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def get(self, name, default=None):
        values = self.get_all(name)
        if not values:
            return default
        assert len(values) == 1, f"header {name} appears {len(values)} times: {self!r}"
        return values[0]

    def has(self, name) -> bool:
        return bool(self.get_all(name))

    def connection_tokens(self) -> set[str]:
        return {t.strip().lower() for v in self.get_all("Connection") for t in v.split(",")}

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        raw = self.raw if len(self.raw) <= 600 else self.raw[:600] + b"..."
        return f"<Response {self.status} {raw!r}>"


class ParseError(ValueError):
    pass


def parse_response(buf: bytes, head=False, closed=False):
    """Parses one response at the start of buf. Returns (Response, bytes consumed), or None when
    more bytes are needed (ParseError if closed is True and it is incomplete)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if closed and buf:
            raise ParseError(f"truncated response head: {buf[:300]!r}")
        return None
    lines = buf[:end].split(CRLF)
    m = re.fullmatch(rb"(HTTP/\d\.\d) (\d{3})(?: (.*))?", lines[0])
    if not m:
        raise ParseError(f"bad status line: {lines[0]!r}")
    status = int(m.group(2))
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b"\n" in line or b"\r" in line:
            raise ParseError(f"bad header line {line!r} in {buf[:end]!r}")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    response = Response(m.group(1).decode(), status, (m.group(3) or b"").decode("latin-1"),
                        headers, b"", b"")
    pos = end + 4
    te = response.get_all("Transfer-Encoding")
    cl = response.get_all("Content-Length")
    if head or 100 <= status < 200 or status in (204, 304):
        pass
    elif te:
        if te[-1].split(",")[-1].strip().lower() != "chunked":
            raise ParseError(f"response with Transfer-Encoding {te}")
        if cl:
            raise ParseError("response has both Content-Length and Transfer-Encoding")
        response.chunked = True
        body = bytearray()
        while True:
            line_end = buf.find(CRLF, pos)
            if line_end < 0:
                break
            size_text = buf[pos:line_end].split(b";")[0].strip()
            if not re.fullmatch(rb"[0-9a-fA-F]{1,16}", size_text):
                raise ParseError(f"bad chunk size {buf[pos:line_end]!r}")
            size = int(size_text, 16)
            pos = line_end + 2
            if size == 0:
                while True:  # trailers up to an empty line
                    line_end = buf.find(CRLF, pos)
                    if line_end < 0:
                        break
                    line = buf[pos:line_end]
                    pos = line_end + 2
                    if not line:
                        response.body = bytes(body)
                        response.raw = buf[:pos]
                        return response, pos
                break
            if len(buf) < pos + size + 2:
                break
            body += buf[pos:pos + size]
            if buf[pos + size:pos + size + 2] != CRLF:
                raise ParseError("chunk data not followed by CRLF")
            pos += size + 2
        if closed:
            raise ParseError(f"truncated chunked body: {buf[:300]!r}")
        return None
    elif cl:
        if len(set(cl)) != 1 or not re.fullmatch(r"\d+", cl[0]):
            raise ParseError(f"bad Content-Length {cl}")
        length = int(cl[0])
        if len(buf) < pos + length:
            if closed:
                raise ParseError(f"truncated body: want {length}, have {len(buf) - pos}: "
                                 f"{buf[:300]!r}")
            return None
        response.body = buf[pos:pos + length]
        pos += length
    else:
        # No framing: the body runs to the end of the connection.
        if not closed:
            return None
        response.body = buf[pos:]
        pos = len(buf)
    response.raw = buf[:pos]
    return response, pos


def parse_responses(data: bytes, heads=(), closed=True):
    """Parses every response in data. heads: indices of responses that answer HEAD requests.
    Returns (responses, leftover bytes)."""
    responses = []
    pos = 0
    while pos < len(data):
        result = parse_response(data[pos:], head=len(responses) in heads, closed=closed)
        if result is None:
            break
        response, used = result
        responses.append(response)
        pos += used
    return responses, data[pos:]


def parse_all(data: bytes, heads=()) -> list[Response]:
    """Parses a whole connection's output; fails on leftover bytes."""
    responses, rest = parse_responses(data, heads=heads, closed=True)
    assert not rest, f"unparsed bytes after {len(responses)} responses: {rest[:300]!r}"
    return responses


def final_responses(responses):
    return [r for r in responses if not 100 <= r.status < 200]


# --------------------------------------------------------------------------------------------
# Sockets


class ConnectionClosed(AssertionError):
    pass


class Conn:
    """A client connection with a read buffer, for keep-alive and pipelining tests."""

    def __init__(self, port, host="127.0.0.1", timeout=5.0, rcvbuf=None, nodelay=True):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.timeout = timeout
        self.buf = b""
        self.eof = False
        self.reset = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.sock.close()

    def abort(self):
        """Closes with RST (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.sock.close()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def send_bytewise(self, data: bytes):
        for i in range(len(data)):
            self.sock.sendall(data[i:i + 1])

    def _fill(self, deadline) -> bool:
        """Reads once. Returns False at EOF or reset."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out; buffered: {self.buf[:300]!r}")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError(f"timed out; buffered: {self.buf[:300]!r}") from None
        except ConnectionResetError:
            self.reset = True
            self.eof = True
            return False
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_response(self, head=False, timeout=None, allow_interim=False) -> Response:
        """Reads one response (skipping 1xx unless allow_interim)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            result = parse_response(self.buf, head=head, closed=self.eof)
            if result is not None:
                response, used = result
                self.buf = self.buf[used:]
                if 100 <= response.status < 200 and not allow_interim:
                    continue
                return response
            if self.eof:
                raise ConnectionClosed(f"connection closed (reset={self.reset}) before a response;"
                                       f" buffered: {self.buf[:300]!r}")
            self._fill(deadline)

    def read_responses(self, count, heads=(), timeout=None) -> list[Response]:
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        return [self.read_response(head=i in heads, timeout=max(deadline - time.monotonic(), 0.001))
                for i in range(count)]

    def read_until(self, marker: bytes, timeout=None) -> bytes:
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while marker not in self.buf:
            if self.eof or not self._fill(deadline):
                raise ConnectionClosed(f"closed before {marker!r}; buffered {self.buf[:300]!r}")
        index = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:index], self.buf[index:]
        return out

    def read_until_close(self, timeout=None) -> bytes:
        """Reads to EOF (or reset; see .reset). Returns everything not yet consumed."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while not self.eof:
            self._fill(deadline)
        out, self.buf = self.buf, b""
        return out

    def expect_closed(self, timeout=None, allow_reset=False) -> float:
        """Asserts the server closes the connection without sending anything more.
        Returns the seconds waited."""
        start = time.monotonic()
        rest = self.read_until_close(timeout)
        assert rest == b"", f"unexpected bytes before close: {rest[:300]!r}"
        assert allow_reset or not self.reset, "the server reset the connection instead of closing"
        return time.monotonic() - start

    def is_open_now(self) -> bool:
        """True if no EOF/reset is pending (does not consume data)."""
        try:
            self.sock.setblocking(False)
            try:
                data = self.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return True
            except ConnectionResetError:
                return False
            return bool(data)
        finally:
            self.sock.setblocking(True)
            self.sock.settimeout(self.timeout)


class RawResult:
    def __init__(self, data, reset, eof, send_error, elapsed):
        self.data = data
        self.reset = reset
        self.eof = eof
        self.send_error = send_error
        self.elapsed = elapsed

    def __repr__(self):
        return (f"<RawResult reset={self.reset} eof={self.eof} send_error={self.send_error} "
                f"elapsed={self.elapsed:.2f}s data={self.data[:400]!r}>")


def raw_exchange(port, data: bytes, read_until_close=True, timeout=5.0, host="127.0.0.1",
                 shut_wr=False) -> RawResult:
    """Connects, sends data, and reads until the server closes (or, without read_until_close,
    until one whole response arrived). Records a reset or a failed send instead of raising."""
    start = time.monotonic()
    c = Conn(port, host=host, timeout=timeout)
    send_error = None
    try:
        try:
            c.send(data)
            if shut_wr:
                c.sock.shutdown(socket.SHUT_WR)
        except OSError as e:  # the server may close before taking it all
            send_error = e
        if read_until_close:
            out = c.read_until_close(timeout)
        else:
            deadline = time.monotonic() + timeout
            while parse_response(c.buf, closed=c.eof) is None and not c.eof:
                c._fill(deadline)
            out = c.buf
        return RawResult(out, c.reset, c.eof, send_error, time.monotonic() - start)
    finally:
        c.close()


def raw(port, data: bytes, read_until_close=True, timeout=5.0, host="127.0.0.1",
        allow_reset=False) -> bytes:
    """Sends data on a new connection and returns the bytes received. With read_until_close the
    server must close the connection within timeout (cleanly, unless allow_reset)."""
    result = raw_exchange(port, data, read_until_close=read_until_close, timeout=timeout,
                          host=host)
    if read_until_close and result.reset and not allow_reset:
        raise AssertionError(f"connection reset by the server (no lingering close): {result!r}")
    return result.data


def wait_refused(host, port, timeout=3.0):
    """Waits (bounded) until connecting is refused. Returns True if it was."""
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while time.monotonic() < deadline:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(1)
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            return True
        except OSError:
            pass
        finally:
            s.close()
        time.sleep(0.02)
    return False


# --------------------------------------------------------------------------------------------
# Metrics

# Label values are quoted strings that may hold braces ({id} in a route pattern).
METRIC_LINE_RE = re.compile(
    r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})?\s+(\S+)(?:\s+\d+)?$'
)
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    """A parsed Prometheus text exposition."""

    def __init__(self, text: str):
        self.text = text
        self.samples: list[tuple[str, dict, float]] = []
        self.types: dict[str, str] = {}
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split()
                if len(parts) >= 4 and parts[1] == "TYPE":
                    self.types[parts[2]] = parts[3]
                continue
            m = METRIC_LINE_RE.match(line)
            assert m, f"bad metrics line: {line!r}"
            labels = dict(LABEL_RE.findall(m.group(2) or ""))
            self.samples.append((m.group(1), labels, float(m.group(3))))

    def find(self, name, **labels) -> list[tuple[dict, float]]:
        return [(l, v) for n, l, v in self.samples
                if n == name and all(l.get(k) == str(want) for k, want in labels.items())]

    def value(self, name, default=None, **labels) -> float:
        found = self.find(name, **labels)
        if not found:
            if default is not None:
                return default
            raise AssertionError(f"no sample {name}{labels} in metrics:\n{self.text[:3000]}")
        assert len(found) == 1, f"{len(found)} samples match {name}{labels}"
        return found[0][1]

    def total(self, name, **labels) -> float:
        return sum(v for _, v in self.find(name, **labels))


# --------------------------------------------------------------------------------------------
# curl


def curl(*args, timeout=10, input=None) -> subprocess.CompletedProcess:
    """Runs the curl binary (no config file, no proxy). Returns the completed process."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(["curl", "-q", "--noproxy", "*", "-sS", *args], capture_output=True,
                          timeout=timeout, input=input, env=env)


def curl_response(*args, timeout=10, input=None) -> Response:
    """curl --include: returns the final response (after any 100 Continue)."""
    result = curl("--include", *args, timeout=timeout, input=input)
    assert result.returncode == 0, f"curl failed ({result.returncode}): {result.stderr!r}"
    head = "-I" in args or "--head" in args
    responses = final_responses(parse_all(result.stdout, heads=range(8) if head else ()))
    assert len(responses) == 1, responses
    return responses[0]


# --------------------------------------------------------------------------------------------
# Checks shared by several modules


def check_common_headers(response: Response, server_name="squall"):
    """Every response has Date (an IMF-fixdate), Server and a length (Content-Length/chunked)."""
    date = response.get("Date")
    assert date, f"no Date header: {response!r}"
    assert re.fullmatch(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|"
                        r"Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT", date), date
    parsed = email.utils.parsedate_to_datetime(date)
    assert abs(parsed.timestamp() - time.time()) < 120, date
    assert response.get("Server") == server_name, response
    assert response.has("Content-Length") or response.chunked, response


def check_rejection(result: RawResult, statuses, max_body=1024) -> Response:
    """An early rejection: exactly one response with an expected status, a short body, Connection:
    close, received in full, then a clean close (no reset)."""
    assert result.eof, f"the server did not close the connection: {result!r}"
    responses = parse_all(result.data)
    assert len(responses) == 1, f"expected one response, got {len(responses)}: {responses!r}"
    response = responses[0]
    if isinstance(statuses, int):
        statuses = (statuses,)
    assert response.status in statuses, f"status {response.status}, want {statuses}: {response!r}"
    assert 0 < len(response.body) <= max_body, f"body is not short: {response!r}"
    assert "close" in response.connection_tokens(), f"no Connection: close: {response!r}"
    check_common_headers(response)
    assert not result.reset, f"connection reset instead of a lingering close: {result!r}"
    return response


def assert_plaintext_ok(port, host="127.0.0.1"):
    with Conn(port, host=host) as c:
        c.send(request("GET", "/plaintext"))
        response = c.read_response()
    assert response.status == 200 and response.body == b"Hello, World!", response


def open_many(host, port, count, timeout=10.0):
    """Connects count non-blocking sockets from one thread; returns them once all are connected."""
    sel = selectors.DefaultSelector()
    socks = []
    pending = 0
    deadline = time.monotonic() + timeout
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex((host, port))
            socks.append(s)
            if err == 0:
                continue
            assert err in (errno.EINPROGRESS, errno.EAGAIN), os.strerror(err)
            sel.register(s, selectors.EVENT_WRITE)
            pending += 1
        while pending:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{pending} connects still pending"
            for key, _ in sel.select(remaining):
                s = key.fileobj
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                assert err == 0, f"connect failed: {os.strerror(err)}"
                sel.unregister(s)
                pending -= 1
    except BaseException:
        for s in socks:
            s.close()
        raise
    finally:
        sel.close()
    return socks


def exchange_many(socks, data: bytes, timeout=10.0) -> list[bytes]:
    """Sends data on every socket and reads one whole response from each (non-blocking, one
    thread). Returns the raw response bytes per socket, in order."""
    sel = selectors.DefaultSelector()
    out = [b""] * len(socks)
    to_send = {}
    for i, s in enumerate(socks):
        to_send[i] = data
        sel.register(s, selectors.EVENT_WRITE | selectors.EVENT_READ, i)
    done = 0
    deadline = time.monotonic() + timeout
    try:
        while done < len(socks):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {done} of {len(socks)} responses within {timeout}s"
            for key, events in sel.select(remaining):
                i = key.data
                s = key.fileobj
                if events & selectors.EVENT_WRITE and to_send.get(i):
                    sent = s.send(to_send[i])
                    to_send[i] = to_send[i][sent:]
                    if not to_send[i]:
                        sel.modify(s, selectors.EVENT_READ, i)
                if events & selectors.EVENT_READ:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise AssertionError(f"connection {i} closed early: {out[i]!r}")
                    out[i] += chunk
                    if parse_response(out[i]) is not None:
                        sel.unregister(s)
                        done += 1
    finally:
        sel.close()
    return out

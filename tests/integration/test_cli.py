"""The command line: --version, --help, --check-config, config errors, --listen, --port-file."""

import re
import socket
import subprocess

import pytest

from squall_helpers import Conn, assert_plaintext_ok, request, squalld_path

VALID_FULL_CONFIG = """\
# Every documented key, with valid values.
[server]
listen = ["127.0.0.1:0", "[::1]:0"]
backlog = 128
max_connections = 500
name = "squall-test"

[limits]
max_url_bytes = "8KiB"
max_header_bytes = "16KiB"
max_header_count = 100
max_body_bytes = "1MiB"
max_chunk_extension_bytes = "4KiB"
write_buffer_high_water = "256KiB"
max_buffered_body_bytes = "64MiB"
max_unsent_bytes = "64MiB"

[timeouts]
header = "10s"
body = "30s"
keepalive = "75s"
write = "30s"
lingering = "2s"
drain = "20s"

[log]
level = "info"
error_log = "stderr"
access_log = "off"
access_format = "json"

[loop]
lag_interval = "250ms"
blocking_threshold = "100ms"

[routes]
plaintext = true
healthz = true
metrics = true
echo = false
"""


def run(*args, timeout=10):
    return subprocess.run([squalld_path(), *args], capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, text=True)


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")


def test_version():
    result = run("--version")
    assert result.returncode == 0, result
    assert re.match(r"squalld \S+", result.stdout), result
    assert re.search(r"\d", result.stdout), result


def test_help():
    result = run("--help")
    assert result.returncode == 0, result
    text = result.stdout + result.stderr
    for option in ("--config", "--check-config", "--listen", "--port-file", "--version"):
        assert option in text, f"--help does not mention {option}: {text}"


def test_check_config_accepts_every_documented_key(tmp_path):
    path = tmp_path / "full.toml"
    path.write_text(VALID_FULL_CONFIG)
    result = run("--config", str(path), "--check-config")
    assert result.returncode == 0, result
    assert "listening on" not in result.stderr


def test_check_config_names_file_line_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[limits]\nmax_url_bytes = "8KiB"\nmax_body_bytes = "lots"\n')
    result = run("--config", str(path), "--check-config")
    assert result.returncode == 1, result
    assert re.search(r"bad\.toml:3: \[limits\] max_body_bytes", result.stderr), result.stderr


BAD_CONFIGS = {
    "unknown_key": ('[server]\nlisten = ["127.0.0.1:0"]\nbogus_key = 1\n', 3, "bogus_key"),
    "unknown_table": ('[server]\nlisten = ["127.0.0.1:0"]\n[nonsense]\nx = 1\n', 3, "nonsense"),
    "string_for_int": ('[server]\nbacklog = "many"\n', 2, "backlog"),
    "string_for_bool": ('[routes]\nhealthz = true\nplaintext = "yes"\n', 3, "plaintext"),
    "int_for_string": ('[server]\n\nname = 5\n', 3, "name"),
    "string_for_array": ('[server]\nlisten = "127.0.0.1:0"\n', 2, "listen"),
    "bad_size": ('[limits]\nmax_header_bytes = "16 apples"\n', 2, "max_header_bytes"),
    "bad_duration": ('[timeouts]\nheader = "10"\n', 2, "header"),
    "bad_listen": ('[server]\nlisten = ["127.0.0.1:notaport"]\n', 2, "listen"),
    "bad_access_format": ('[log]\n\n\naccess_format = "xml"\n', 4, "access_format"),
    "bad_level": ('[log]\nlevel = "loud"\n', 2, "level"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_check_config_rejects(tmp_path, case):
    text, line, key = BAD_CONFIGS[case]
    path = tmp_path / "squalld.toml"
    path.write_text(text)
    result = run("--config", str(path), "--check-config")
    assert result.returncode == 1, result
    assert key in result.stderr, f"error does not name {key}: {result.stderr!r}"
    assert f":{line}:" in result.stderr, f"error does not name line {line}: {result.stderr!r}"


def test_toml_syntax_error_names_line(tmp_path):
    path = tmp_path / "syntax.toml"
    path.write_text('[server]\nname = "squall"\nbacklog = = 3\n')
    result = run("--config", str(path), "--check-config")
    assert result.returncode == 1, result
    assert "syntax.toml" in result.stderr and "3" in result.stderr, result.stderr


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    result = run("--config", str(missing), "--check-config")
    assert result.returncode != 0, result
    assert "nope.toml" in result.stderr, result.stderr


def test_invalid_config_does_not_start(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nlisten = ["127.0.0.1:0"]\n[limits]\nmax_body_bytes = -1\n')
    result = run("--config", str(path))
    assert result.returncode == 1, result
    assert "max_body_bytes" in result.stderr
    assert "listening on" not in result.stderr


def test_port_file_matches_listening_line(squalld):
    # The file is written before the line: it must be there as soon as the line is. Several
    # starts, since an ordering race shows only sometimes.
    for _ in range(5):
        server = squalld()
        assert server.port_file.exists(), "port file not yet written at the 'listening on' line"
        first_line = server.port_file.read_text().splitlines()[0]
        assert first_line == f"127.0.0.1:{server.port}"
        assert server.port != 0
        assert_plaintext_ok(server.port)
        server.stop()


def test_bind_failure_exits_nonzero(tmp_path, squalld):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = squalld(config={"server": {"listen": [f"127.0.0.1:{port}"]}}, start=False)
        result = subprocess.run(server.command(), capture_output=True, text=True, timeout=10,
                                stdin=subprocess.DEVNULL)
    assert result.returncode != 0, result
    assert str(port) in result.stderr, result.stderr


@needs_ipv6
def test_listen_option_replaces_config_list(squalld):
    # The config asks for [::1]; --listen must replace it, not add to it.
    server = squalld(config={"server": {"listen": ["[::1]:0"]}},
                     args=["--listen", "127.0.0.1:0"])
    assert server.host == "127.0.0.1"
    assert_plaintext_ok(server.port)
    assert not any("::1" in line for line in server.lines if "listening on" in line), server.lines


@needs_ipv6
def test_listen_option_repeated(squalld):
    server = squalld(args=["--listen", "127.0.0.1:0", "--listen", "[::1]:0"], listeners=2)
    hosts = sorted(host for host, _ in server.addresses)
    assert hosts == ["127.0.0.1", "::1"], server.addresses
    for host, port in server.addresses:
        assert_plaintext_ok(port, host=host)


@needs_ipv6
def test_ipv6_listen_in_config(squalld):
    server = squalld(config={"server": {"listen": ["[::1]:0"]}})
    assert server.host == "::1"
    with Conn(server.port, host="::1") as c:
        c.send(request("GET", "/healthz"))
        response = c.read_response()
    assert response.status == 200, response
    assert response.json()["status"] == "ok"

"""The access log: combined and JSON formats, stderr and off, reopening on SIGUSR1."""

import json
import re
import signal
import time

import pytest

from squall_helpers import assert_plaintext_ok, request

COMBINED_RE = re.compile(
    r'^(?P<addr>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}) '
    r'(?P<bytes>\d+|-) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"')


@pytest.fixture(scope="module")
def server(module_squalld):
    return module_squalld()


def get_with_agent(srv, target, agent, referer=None):
    headers = [("User-Agent", agent)]
    if referer:
        headers.append(("Referer", referer))
    return srv.get(target, headers=headers)


def test_combined_line(server):
    response = get_with_agent(server, "/plaintext", "combined-test/1.0",
                              referer="http://example.test/from")
    assert response.status == 200
    line = server.wait_access_line(lambda l: "combined-test/1.0" in l)
    assert '"GET /plaintext HTTP/1.1" 200 13' in line, line
    m = COMBINED_RE.match(line)
    assert m, f"not a combined log line: {line!r}"
    assert m.group("addr") == "127.0.0.1"
    assert m.group("referer") == "http://example.test/from"
    assert re.fullmatch(r"\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}", m.group("time")), line


def test_one_line_per_request(server):
    agents = [f"count-test-{i}" for i in range(6)]
    with server.conn() as c:
        c.send(b"".join(request("GET", "/plaintext", headers=[("User-Agent", a)])
                        for a in agents[:3]))
        c.read_responses(3)
        for agent in agents[3:]:
            c.send(request("GET", "/healthz", headers=[("User-Agent", agent)]))
            c.read_response()
    server.wait_access_line(lambda l: agents[-1] in l)
    lines = server.access_lines()
    for agent in agents:
        matching = [l for l in lines if f'"{agent}"' in l]
        assert len(matching) == 1, (agent, matching)


def test_error_statuses_are_logged(server):
    assert get_with_agent(server, "/missing", "status-test").status == 404
    line = server.wait_access_line(lambda l: "status-test" in l)
    assert '"GET /missing HTTP/1.1" 404 ' in line, line


def test_json_format(squalld):
    srv = squalld(config={"log": {"access_format": "json"}})
    assert get_with_agent(srv, "/plaintext", "json-test").status == 200
    with srv.conn() as c:
        c.send(request("POST", "/echo", body=b"12345", headers=[("User-Agent", "json-post")]))
        assert c.read_response().status == 200

    def is_post(line):
        return "json-post" in line

    srv.wait_access_line(is_post)
    entries = [json.loads(line) for line in srv.access_lines()]  # every line is JSON
    assert all(isinstance(e, dict) for e in entries)
    gets = [e for e in entries if e.get("target") == "/plaintext"]
    posts = [e for e in entries if e.get("target") == "/echo"]
    assert len(gets) == 1 and len(posts) == 1, entries
    assert gets[0]["method"] == "GET" and gets[0]["status"] == 200, gets
    assert posts[0]["method"] == "POST" and posts[0]["status"] == 200, posts


def test_access_log_to_stderr(squalld):
    srv = squalld(config={"log": {"access_log": "stderr"}})
    assert get_with_agent(srv, "/plaintext", "stderr-test").status == 200
    line, _ = srv.wait_for_line("stderr-test", timeout=5)
    assert '"GET /plaintext HTTP/1.1" 200 13' in line, line


def test_access_log_off(squalld):
    srv = squalld(config={"log": {"access_log": "off"}})
    assert get_with_agent(srv, "/plaintext", "off-test").status == 200
    srv.stop()  # everything is flushed once the process has exited
    assert not any("off-test" in line or "GET /plaintext" in line for line in srv.lines), \
        srv.stderr_text()
    assert not srv.access_log.exists() or "off-test" not in srv.access_log.read_text()


def test_sigusr1_reopens_access_log(squalld):
    srv = squalld()
    assert get_with_agent(srv, "/plaintext", "before-rotate").status == 200
    srv.wait_access_line(lambda l: "before-rotate" in l)
    rotated = srv.access_log.with_name("access.log.1")
    srv.access_log.rename(rotated)
    srv.signal(signal.SIGUSR1)
    # The reopen happens asynchronously: probe (bounded) until requests land in a new file at
    # the original path.
    deadline = time.monotonic() + 5
    probe = 0
    while True:
        probe += 1
        assert get_with_agent(srv, "/plaintext", f"probe-{probe}").status == 200
        end = time.monotonic() + 0.2
        found = False
        while time.monotonic() < end:
            if srv.access_log.exists() and "probe-" in srv.access_log.read_text():
                found = True
                break
            time.sleep(0.02)
        if found:
            break
        assert time.monotonic() < deadline, "no new access log at the original path"
    assert get_with_agent(srv, "/plaintext", "after-reopen").status == 200
    line = srv.wait_access_line(lambda l: "after-reopen" in l)
    assert '"GET /plaintext HTTP/1.1" 200 13' in line
    old = rotated.read_text()
    assert "before-rotate" in old
    assert "after-reopen" not in old
    assert srv.running()
    assert_plaintext_ok(srv.port)

"""The built-in routes: /plaintext, /healthz, /metrics, /echo; 404, 405, HEAD, decoding."""

import time

import pytest

from squall_helpers import (Metrics, check_common_headers, curl, curl_response, parse_all,
                            raw, request)


@pytest.fixture(scope="module")
def server(module_squalld):
    return module_squalld(config={"loop": {"lag_interval": "50ms"}})


@pytest.fixture(scope="module")
def routes_off(module_squalld):
    return module_squalld(config={
        "server": {"name": "edge-test/1.0"},
        "routes": {"plaintext": False, "healthz": False, "metrics": False, "echo": False},
    })


def test_plaintext(server):
    response = server.get("/plaintext")
    assert response.status == 200, response
    assert response.body == b"Hello, World!"
    assert response.get("Content-Type").split(";")[0].strip() == "text/plain"
    assert response.get("Content-Length") == "13"
    check_common_headers(response)


def test_plaintext_with_curl(server):
    response = curl_response(server.url("/plaintext"))
    assert response.status == 200
    assert response.body == b"Hello, World!"
    assert response.get("Server") == "squall"


def test_healthz(server):
    response = server.get("/healthz")
    assert response.status == 200, response
    assert response.get("Content-Type").split(";")[0].strip() == "application/json"
    check_common_headers(response)
    data = response.json()
    assert data["status"] == "ok"
    assert isinstance(data["uptime_seconds"], (int, float)) and data["uptime_seconds"] >= 0
    assert isinstance(data["connections"], int) and not isinstance(data["connections"], bool)
    assert data["connections"] >= 1  # this one
    assert isinstance(data["loop_lag_ms"], (int, float)) and data["loop_lag_ms"] >= 0


def test_healthz_counts_open_connections(server):
    with server.conn() as a, server.conn() as b:
        for c in (a, b):
            c.send(request("GET", "/plaintext"))
            assert c.read_response().status == 200
        with server.conn() as c:
            c.send(request("GET", "/healthz"))
            data = c.read_response().json()
        assert data["connections"] >= 3, data


def test_healthz_uptime_grows(server):
    first = server.get("/healthz").json()["uptime_seconds"]
    deadline = time.monotonic() + 3
    while True:  # uptime may have a coarse resolution; wait (bounded) until it moves
        second = server.get("/healthz").json()["uptime_seconds"]
        if second > first or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert second > first


def wait_metrics(server, check, timeout=3.0):
    """Metrics are recorded when a response completes: poll (bounded) until check(m) holds."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if check(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.02)


def test_metrics_format(server):
    server.get("/plaintext")
    response = server.get("/metrics")
    assert response.status == 200, response
    content_type = response.get("Content-Type")
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    check_common_headers(response)
    m = Metrics(response.text)
    assert m.value("squall_http_requests_total", route="/plaintext", code="2xx") >= 1
    for name in ("squall_connections_open", "squall_connections_accepted_total",
                 "squall_connections_refused_total", "squall_http_received_bytes_total",
                 "squall_http_sent_bytes_total"):
        assert m.find(name), f"{name} missing:\n{response.text}"
    assert m.value("squall_connections_open") >= 1
    # The requests above were read into a workspace of the pool.
    assert m.value("squall_http_workspaces_created_total") >= 1
    assert m.types.get("squall_http_workspaces_created_total") == "counter", m.types
    assert m.types.get("squall_http_spare_workspaces") == "gauge", m.types
    for histogram in ("squall_http_request_duration_seconds", "squall_loop_lag_seconds"):
        buckets = m.find(histogram + "_bucket")
        assert buckets, f"{histogram}_bucket missing"
        assert m.types.get(histogram) == "histogram", m.types
        count = m.total(histogram + "_count")
        inf = sum(v for labels, v in buckets if labels.get("le") == "+Inf")
        assert inf == count, (histogram, inf, count)
        assert m.find(histogram + "_sum")
        # Buckets are cumulative: non-decreasing in le within one label set.
        groups = {}
        for labels, v in buckets:
            key = tuple(sorted((k, val) for k, val in labels.items() if k != "le"))
            groups.setdefault(key, []).append((float(labels["le"]), v))
        for series in groups.values():
            values = [v for _, v in sorted(series)]
            assert values == sorted(values), series
    assert m.total("squall_http_request_duration_seconds_count") >= 1
    # Loop lag is sampled every lag_interval (50 ms here): wait (bounded) for a sample.
    m = wait_metrics(server, lambda m: m.total("squall_loop_lag_seconds_count") >= 1)
    assert m.total("squall_loop_lag_seconds_count") >= 1


def test_metrics_count_requests_by_route_and_class(server):
    before = server.metrics()
    plaintext0 = before.value("squall_http_requests_total", 0.0, route="/plaintext", code="2xx")
    not_found0 = before.total("squall_http_requests_total", code="4xx")
    accepted0 = before.value("squall_connections_accepted_total")
    received0 = before.value("squall_http_received_bytes_total")
    sent0 = before.value("squall_http_sent_bytes_total")
    for _ in range(3):
        assert server.get("/plaintext").status == 200
    assert server.get("/no/such/thing").status == 404

    def plaintext(m):
        return m.value("squall_http_requests_total", 0.0, route="/plaintext", code="2xx")

    after = wait_metrics(server, lambda m: plaintext(m) >= plaintext0 + 3)
    assert plaintext(after) == plaintext0 + 3
    assert after.total("squall_http_requests_total", code="4xx") >= not_found0 + 1
    # 4 requests + the 'after' metrics connection (+ any polls), each a new connection.
    assert after.value("squall_connections_accepted_total") >= accepted0 + 5
    assert after.value("squall_http_received_bytes_total") >= received0 + 4 * 30
    assert after.value("squall_http_sent_bytes_total") >= sent0 + 3 * 100


def test_echo(server):
    body = bytes(range(256)) * 40
    with server.conn() as c:
        c.send(request("POST", "/echo", headers=[("Content-Type", "image/x-test")], body=body))
        response = c.read_response()
    assert response.status == 200, response
    assert response.body == body
    assert response.get("Content-Type") == "image/x-test"
    check_common_headers(response)


def test_echo_default_content_type(server):
    with server.conn() as c:
        c.send(request("POST", "/echo", body=b"abc"))
        response = c.read_response()
    assert response.status == 200 and response.body == b"abc", response
    assert response.get("Content-Type") == "application/octet-stream"


def test_echo_empty_body(server):
    with server.conn() as c:
        c.send(request("POST", "/echo", body=b""))
        response = c.read_response()
    assert response.status == 200, response
    assert response.body == b""
    assert response.get("Content-Length") == "0" or response.chunked


def test_echo_with_curl(server, tmp_path):
    body = bytes(range(256)) * 400  # 100 KiB: curl sends Expect: 100-continue
    path = tmp_path / "body.bin"
    path.write_bytes(body)
    result = curl("-X", "POST", "--data-binary", f"@{path}", "-H", "Content-Type: text/x-curl",
                  "-w", "\n%{http_code} %{content_type}", server.url("/echo"))
    assert result.returncode == 0, result.stderr
    out, _, trailer = result.stdout.rpartition(b"\n")
    assert out == body
    assert trailer == b"200 text/x-curl", trailer


def test_unknown_path_404(server):
    response = server.get("/nope")
    assert response.status == 404, response
    check_common_headers(response)


@pytest.mark.parametrize("method,target,allowed", [
    ("POST", "/plaintext", {"GET", "HEAD"}),
    ("DELETE", "/plaintext", {"GET", "HEAD"}),
    ("POST", "/healthz", {"GET", "HEAD"}),
    ("PUT", "/metrics", {"GET", "HEAD"}),
    ("GET", "/echo", {"POST"}),
])
def test_wrong_method_405(server, method, target, allowed):
    with server.conn() as c:
        c.send(request(method, target, body=b"x" if method in ("POST", "PUT") else b""))
        response = c.read_response()
        assert response.status == 405, response
        allow = {token.strip() for token in response.get("Allow", "").split(",") if token.strip()}
        assert allowed <= allow, response
        check_common_headers(response)
        # The connection stays usable after a 405.
        c.send(request("GET", "/plaintext"))
        assert c.read_response().status == 200


def test_head_plaintext(server):
    # HEAD then GET on one connection: the HEAD answer must carry no body, or the second
    # response would not parse.
    with server.conn() as c:
        c.send(request("HEAD", "/plaintext") + request("GET", "/plaintext"))
        head = c.read_response(head=True)
        get = c.read_response()
    assert head.status == 200, head
    assert head.get("Content-Length") == "13"
    assert head.body == b""
    check_common_headers(head)
    assert get.status == 200 and get.body == b"Hello, World!", get


def test_head_with_curl(server):
    result = curl("-I", "-w", "%{http_code} %{size_download}", server.url("/plaintext"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(b"200 0"), result.stdout
    assert b"Content-Length: 13" in result.stdout or b"content-length: 13" in result.stdout.lower()


@pytest.mark.parametrize("status,target", [
    (404, "/nope"), (405, None), (400, "/%zz"),
])
def test_error_responses_have_common_headers(server, status, target):
    data = (request("POST", "/plaintext", body=b"x") if target is None
            else request("GET", target))
    with server.conn() as c:
        c.send(data)
        response = c.read_response()
    assert response.status == status, response
    check_common_headers(response)


@pytest.mark.parametrize("target", ["/plain%74ext", "/%70laintext", "/plain%74%65%78t",
                                    "/%70%6C%61%69%6E%74%65%78%74"])
def test_percent_decoded_before_routing(server, target):
    response = server.get(target)
    assert response.status == 200, response
    assert response.body == b"Hello, World!"


@pytest.mark.parametrize("target", ["/%zz", "/plaintext%", "/plain%7", "/%g0"])
def test_bad_percent_escape_400(server, target):
    data = raw(server.port, request("GET", target, headers=[("Connection", "close")]))
    responses = parse_all(data)
    assert len(responses) == 1 and responses[0].status == 400, responses


def test_absolute_form_target(server):
    with server.conn() as c:
        c.send(request("GET", "http://localhost/plaintext", host="localhost"))
        response = c.read_response()
    assert response.status == 200, response
    assert response.body == b"Hello, World!"


def test_server_name_config(routes_off):
    response = routes_off.get("/anything")
    assert response.status == 404
    assert response.get("Server") == "edge-test/1.0"


@pytest.mark.parametrize("method,target", [
    ("GET", "/plaintext"), ("GET", "/healthz"), ("GET", "/metrics"), ("POST", "/echo"),
    ("HEAD", "/plaintext"),
])
def test_disabled_route_is_404(routes_off, method, target):
    with routes_off.conn() as c:
        c.send(request(method, target, body=b"abc" if method == "POST" else b""))
        response = c.read_response(head=method == "HEAD")
    assert response.status == 404, response
    check_common_headers(response, server_name="edge-test/1.0")

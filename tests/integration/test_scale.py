"""Many concurrent keep-alive connections, from one thread with non-blocking sockets."""

import time

from squall_helpers import exchange_many, open_many, parse_all, request

COUNT = 1000


def test_thousand_concurrent_keepalive_connections(squalld):
    srv = squalld(config={"server": {"backlog": 2048}})
    socks = open_many(srv.host, srv.port, COUNT)
    try:
        for round_ in range(2):  # twice on the same connections: they are kept alive
            outputs = exchange_many(socks, request("GET", "/plaintext"))
            for i, data in enumerate(outputs):
                responses = parse_all(data)
                assert len(responses) == 1, (round_, i, data)
                assert responses[0].status == 200, (round_, i, responses)
                assert responses[0].body == b"Hello, World!"
                assert "close" not in responses[0].connection_tokens()
            m = srv.metrics()
            assert COUNT <= m.value("squall_connections_open") <= COUNT + 1, m.text
        health = srv.get("/healthz").json()
        assert health["connections"] >= COUNT, health
        assert srv.metrics().value("squall_connections_accepted_total") >= COUNT
    finally:
        for s in socks:
            s.close()
    # The gauge follows the closes (handled asynchronously: bounded poll).
    deadline = time.monotonic() + 5
    while True:
        open_now = srv.metrics().value("squall_connections_open")
        if open_now <= 1:
            break
        assert time.monotonic() < deadline, f"squall_connections_open stuck at {open_now}"
        time.sleep(0.05)

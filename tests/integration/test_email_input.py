"""POST /email input that once escaped the request parser: a JSON number out of range is a 400
naming its field, with no error-log line (it used to be a 500 and an ERROR per request)."""

import pytest

from squall_helpers import request

JSON = ("Content-Type", "application/json")


@pytest.fixture(scope="module")
def server(module_squalld, tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "jobs.db"
    # Nothing is ever queued here, so the relay is never reached.
    return module_squalld(config={"jobs": {"store": str(store)},
                                  "smtp": {"url": "smtp://127.0.0.1:9"}})


@pytest.mark.parametrize("body, field", [
    (b'{"to": "a@example.com", "subject": "s", "text": "t", "x": 1e999}', "x"),
    (b'{"to": ["a@example.com", -1e400], "subject": "s", "text": "t"}', "to[1]"),
    (b'{"to": "a@example.com", "subject": 1E+9999, "text": "t"}', "subject"),
    (b'1e999', "body"),
])
def test_number_out_of_range_is_400_naming_the_field(server, body, field):
    with server.conn() as c:
        c.send(request("POST", "/email", headers=[JSON], body=body))
        response = c.read_response()
    assert response.status == 400, response
    reply = response.json()
    assert reply["field"] == field, reply
    assert "out of range" in reply["error"], reply
    assert not server.error_lines(), server.error_lines()

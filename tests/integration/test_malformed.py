"""Malformed requests and request-smuggling vectors. Each must get one 4xx (or 505) with a short
body, Connection: close and a clean close, never a second response, and the server goes on
serving new connections. Most cases append a well-formed request (FOLLOW) so that any leniency
in framing shows up as a second response."""

import pytest

from squall_helpers import FOLLOW, assert_plaintext_ok, check_rejection, raw_exchange

CLIENT_ERROR = tuple(range(400, 500))


def post(headers: bytes, body: bytes, follow=True) -> bytes:
    return (b"POST /echo HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n" + body
            + (FOLLOW if follow else b""))


def get(headers: bytes, follow=True, target=b"/plaintext") -> bytes:
    return (b"GET " + target + b" HTTP/1.1\r\n" + headers + b"\r\n"
            + (FOLLOW if follow else b""))


def chunked_post(body: bytes) -> bytes:
    return post(b"Transfer-Encoding: chunked\r\n", body)


CASES = {
    # Content-Length and Transfer-Encoding together.
    "cl_then_te": (post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
                   CLIENT_ERROR),
    "te_then_cl": (post(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"),
                   CLIENT_ERROR),
    "cl_zero_with_te": (post(b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
                             b"5\r\nhello\r\n0\r\n\r\n"), CLIENT_ERROR),
    # Bad Content-Length.
    "two_cl_same": (post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), CLIENT_ERROR),
    "two_cl_differ": (post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
                      CLIENT_ERROR),
    "cl_list": (post(b"Content-Length: 5, 6\r\n", b"hello!"), CLIENT_ERROR),
    "cl_plus": (post(b"Content-Length: +5\r\n", b"hello"), CLIENT_ERROR),
    "cl_hex": (post(b"Content-Length: 0x5\r\n", b"hello"), CLIENT_ERROR),
    "cl_negative": (post(b"Content-Length: -1\r\n", b"hello"), CLIENT_ERROR),
    "cl_inner_space": (post(b"Content-Length: 5 5\r\n", b"hello"), CLIENT_ERROR),
    "cl_20_digits": (post(b"Content-Length: 123456789012345678901234\r\n", b"hello"),
                     CLIENT_ERROR),
    "cl_empty": (post(b"Content-Length: \r\n", b"hello"), CLIENT_ERROR),
    # Bad Transfer-Encoding.
    "te_chunked_then_gzip": (post(b"Transfer-Encoding: chunked, gzip\r\n",
                                  b"5\r\nhello\r\n0\r\n\r\n"), CLIENT_ERROR),
    "te_gzip_alone": (post(b"Transfer-Encoding: gzip\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
                      CLIENT_ERROR),
    "te_space_before_colon": (post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"),
                              CLIENT_ERROR),
    "te_xchunked": (post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"), CLIENT_ERROR),
    "te_two_lines_last_not_chunked": (
        post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
             b"5\r\nhello\r\n0\r\n\r\n"), CLIENT_ERROR),
    # Header syntax.
    "obs_fold_first_line": (b"GET / HTTP/1.1\r\n Host: a\r\n\r\n" + FOLLOW, CLIENT_ERROR),
    "obs_fold_hides_cl": (post(b"X: a\r\n Content-Length: 5\r\n", b"hello"), CLIENT_ERROR),
    "bare_cr_in_value": (get(b"Host: a\r\nX: a\rb\r\n"), CLIENT_ERROR),
    "bare_lf_line_endings": (b"GET /plaintext HTTP/1.1\nHost: a\n\n" + FOLLOW, CLIENT_ERROR),
    "bare_lf_one_header": (b"GET /plaintext HTTP/1.1\r\nHost: a\nX: b\r\n\r\n" + FOLLOW,
                           CLIENT_ERROR),
    "nul_in_value": (get(b"Host: a\r\nX: a\x00b\r\n"), CLIENT_ERROR),
    "control_char_in_value": (get(b"Host: a\r\nX: a\x01b\r\n"), CLIENT_ERROR),
    "escape_char_in_value": (get(b"Host: a\r\nX: a\x1bb\r\n"), CLIENT_ERROR),
    "empty_header_name": (get(b"Host: a\r\n: z\r\n"), CLIENT_ERROR),
    # Chunked framing.
    "chunk_size_junk": (chunked_post(b"1junk\r\nx\r\n0\r\n\r\n"), CLIENT_ERROR),
    "chunk_size_0x": (chunked_post(b"0x1\r\nx\r\n0\r\n\r\n"), CLIENT_ERROR),
    "chunk_size_trailing_space": (chunked_post(b"5 \r\nhello\r\n0\r\n\r\n"), CLIENT_ERROR),
    "chunk_size_17_hex_digits": (chunked_post(b"10000000000000001\r\nx\r\n0\r\n\r\n"),
                                 CLIENT_ERROR),
    "chunk_data_without_crlf": (chunked_post(b"5\r\nhelloXX0\r\n\r\n"), CLIENT_ERROR),
    "chunk_extension_bare_lf_inside": (chunked_post(b"5;a\nb\r\nhello\r\n0\r\n\r\n"),
                                       CLIENT_ERROR),
    "chunk_extension_bare_lf_end": (chunked_post(b"5;a=b\nhello\r\n0\r\n\r\n"), CLIENT_ERROR),
    # Host.
    "http11_without_host": (b"GET /plaintext HTTP/1.1\r\n\r\n" + FOLLOW, (400,)),
    "two_host_lines": (get(b"Host: a\r\nHost: b\r\n"), (400,)),
    "host_list": (get(b"Host: a, b\r\n"), (400,)),
    # RFC 9112 3.2: Host is uri-host [":" port].
    "host_userinfo": (get(b"Host: user@host\r\n"), (400,)),
    "host_path": (get(b"Host: host/x\r\n"), (400,)),
    "host_open_bracket": (get(b"Host: [::1\r\n"), (400,)),
    "host_two_ports": (get(b"Host: host:1:80\r\n"), (400,)),
    # RFC 9112 5.1: no whitespace between a field name and its colon.
    "space_before_colon": (get(b"Host: a\r\nX-Custom : 1\r\n"), (400,)),
    "space_before_colon_of_cl": (post(b"Content-Length : 5\r\n", b"hello"), (400,)),
    # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing; the connection closes.
    "te_in_http_1_0": (b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n"
                       b"Connection: keep-alive\r\n\r\n5\r\nhello\r\n0\r\n\r\n" + FOLLOW,
                       (400,)),
    "te_in_http_1_0_with_cl": (b"POST /echo HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked"
                               b"\r\nContent-Length: 5\r\n\r\nhello" + FOLLOW, (400,)),
    # Versions.
    "http_2_0": (b"GET /plaintext HTTP/2.0\r\nHost: a\r\n\r\n" + FOLLOW, (505,)),
    "http_1_2": (b"GET /plaintext HTTP/1.2\r\nHost: a\r\n\r\n" + FOLLOW, (505,)),
    "http_0_9": (b"GET /\r\n", (400,)),
}


@pytest.fixture(scope="module")
def server(module_squalld):
    return module_squalld(config={"timeouts": {"lingering": "300ms", "header": "3s",
                                               "body": "3s"}})


@pytest.mark.parametrize("case", list(CASES))
def test_malformed(server, case):
    data, statuses = CASES[case]
    result = raw_exchange(server.port, data)
    check_rejection(result, statuses)
    assert_plaintext_ok(server.port)


def test_well_formed_control_case(server):
    # The building blocks above are well-formed when the bad part is removed.
    result = raw_exchange(server.port, post(b"Content-Length: 5\r\nConnection: close\r\n",
                                            b"hello", follow=False))
    assert result.eof and not result.reset
    assert result.data.startswith(b"HTTP/1.1 200 "), result
    assert result.data.endswith(b"\r\n\r\nhello"), result


@pytest.mark.parametrize("host", [b"example.test", b"example.test:8080", b"127.0.0.1:80",
                                  b"[::1]:8080", b"", b"xn--bcher-kva.example"])
def test_valid_host_values_are_served(server, host):
    result = raw_exchange(server.port, b"GET /plaintext HTTP/1.1\r\nHost: " + host +
                          b"\r\nConnection: close\r\n\r\n")
    assert result.data.startswith(b"HTTP/1.1 200 "), result

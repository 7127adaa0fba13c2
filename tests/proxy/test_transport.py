"""The request headers the data path reads, among the many a client sends."""

from __future__ import annotations

from proxy.transport import RequestHeaders

# What the official ``openai`` Python client sends with every request (ASGI: lower-case names).
SDK_HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
    (b"accept", b"application/json"),
    (b"content-type", b"application/json"),
    (b"user-agent", b"OpenAI/Python 3.57.0"),
    (b"x-stainless-lang", b"python"),
    (b"x-stainless-package-version", b"3.57.0"),
    (b"x-stainless-os", b"Linux"),
    (b"x-stainless-arch", b"x64"),
    (b"x-stainless-runtime", b"CPython"),
    (b"x-stainless-runtime-version", b"3.11.7"),
    (b"x-stainless-async", b"false"),
    (b"x-stainless-retry-count", b"0"),
    (b"x-stainless-read-timeout", b"600"),
]


def test_every_header_the_data_path_reads_is_read_among_a_clients_others() -> None:
    raw = [
        *SDK_HEADERS[:3],
        (b"authorization", b"Bearer rp-key"),
        (b"x-request-id", b"req-1"),
        *SDK_HEADERS[3:8],
        (b"content-length", b"42"),
        (b"x-session-id", b"conversation-7"),
        (b"x-user-id", b"alice"),
        *SDK_HEADERS[8:],
        (b"x-routerpanel-hop", b"abc"),
        (b"x-routerpanel-explain", b"1"),
    ]

    headers = RequestHeaders.parse(raw)

    assert headers == RequestHeaders(
        authorization=b"Bearer rp-key",
        request_id="req-1",
        hops=b"abc",
        content_length=42,
        routing={"x-session-id": "conversation-7", "x-user-id": "alice"},
        explain=True,
    )


def test_a_client_that_sends_none_of_them_gets_the_defaults() -> None:
    assert RequestHeaders.parse(SDK_HEADERS) == RequestHeaders()


def test_a_user_id_alone_is_a_routing_key_and_a_bad_length_is_ignored() -> None:
    headers = RequestHeaders.parse([(b"x-user-id", b"bob"), (b"content-length", b"many")])

    assert headers.routing == {"x-user-id": "bob"}
    assert headers.content_length is None

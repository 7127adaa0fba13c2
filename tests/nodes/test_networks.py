"""nodes.networks: a node's URL in one spelling, so one backend is one node."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from nodes.networks import clean_networks, normalize_node_url, validate_node_url


@pytest.mark.parametrize(
    "spelling",
    [
        "http://127.0.0.1:8000",
        "http://localhost:8000",
        "http://LOCALHOST.:8000/",
        "http://127.1:8000",
        "http://2130706433:8000",
        "http://0x7f.0.0.1:8000",
        "http://0x7f000001:8000",
        "http://[::ffff:127.0.0.1]:8000",
        "HTTP://127.0.0.1:8000//",
    ],
)
def test_every_spelling_of_one_address_is_one_url(spelling: str) -> None:
    assert normalize_node_url(spelling) == "http://127.0.0.1:8000"


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ("http://10.0.0.5:80", "http://10.0.0.5"),
        ("https://engine.example:443/v1/", "https://engine.example/v1"),
        ("https://engine.example:8443", "https://engine.example:8443"),
        ("http://[0:0:0:0:0:0:0:1]:8000", "http://[::1]:8000"),
        ("http://[FD00::0005]:8000", "http://[fd00::5]:8000"),
        ("http://Engine-7.Cluster.Local.:8000", "http://engine-7.cluster.local:8000"),
        ("http://my_service:8000", "http://my_service:8000"),
    ],
)
def test_literal_forms_are_standardised_and_names_kept(written: str, stored: str) -> None:
    assert normalize_node_url(written) == stored


@pytest.mark.parametrize(
    "url",
    [
        "http://my host:8000",
        "http://127.0.0.1:8000/a b",
        "http://127.0.0.1:8000/a\tb",
        "http://127.0.0.1:8000/\x00",
        "http://\ud800:8000",
        "http://bücher.example:8000",
        'http://127.0.0.1:8000/"x',
        "http://010.0.0.1:8000",
        "http://256.0.0.1:8000",
        "http://1.2.3.4.5:8000",
        "http://a..b:8000",
        "http://127.0.0.1:0",
        "http://127.0.0.1:8000?x=1",
        "http://127.0.0.1:8000#",
        "http://user:secret@127.0.0.1:8000",
        "ftp://127.0.0.1:8000",
        "127.0.0.1:8000",
        42,
    ],
)
def test_what_is_not_a_base_url_is_refused(url: object) -> None:
    with pytest.raises(ValidationError) as caught:
        normalize_node_url(url)
    assert "secret" not in str(caught.value)


def test_a_bind_address_is_refused_where_it_is_stored() -> None:
    assert normalize_node_url("http://0.0.0.0:8000") == "http://0.0.0.0:8000"
    with pytest.raises(ValidationError, match="binds to"):
        validate_node_url("http://0.0.0.0:8000")
    with pytest.raises(ValidationError, match="binds to"):
        validate_node_url("http://[::]:8000")


def test_an_allow_list_is_standard_networks_without_repeats() -> None:
    assert clean_networks(["10.1.2.3/8", "10.0.0.0/8", "fd00::1"]) == ["10.0.0.0/8", "fd00::1/128"]
    with pytest.raises(ValidationError):
        clean_networks(["not a network"])

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from nodes.choices import AliasOrigin, NodeRole
from nodes.models import ControlPlane, Node, RoutePolicy, aliases_for_model, normalize_node_url


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://127.0.0.1:8100", "http://127.0.0.1:8100"),
        ("http://127.0.0.1:8100/", "http://127.0.0.1:8100"),
        ("  HTTP://Engine-A.Local:8100//  ", "http://engine-a.local:8100"),
        ("https://engine.example.com/v1-prefix/", "https://engine.example.com/v1-prefix"),
        ("http://[::1]:9000/", "http://[::1]:9000"),
    ],
)
def test_it_normalises_node_urls(raw: str, expected: str) -> None:
    assert normalize_node_url(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", "127.0.0.1:8100", "ftp://host:21", "http://", "http://host:99999", "http://host:8000/?x=1", "http://u:p@h:1"],
)
def test_it_rejects_urls_without_http_scheme_or_host(raw: str) -> None:
    with pytest.raises(ValidationError):
        normalize_node_url(raw)


@pytest.mark.parametrize(
    ("value", "role"),
    [
        (1, "hybrid"),
        (2, "prefill"),
        (3, "decode"),
        ("2", "prefill"),
        ("Decode", "decode"),
        ("EngineRole.PREFILL", "prefill"),
    ],
)
def test_it_reads_roles_as_dlrouter_sends_them(value, role: str) -> None:
    assert NodeRole.from_dlrouter(value) == role


@pytest.mark.parametrize("value", [0, 4, True, "leader", None, 2.5])
def test_it_refuses_unknown_roles(value) -> None:
    with pytest.raises(ValueError, match="unknown role"):
        NodeRole.from_dlrouter(value)


def test_it_derives_path_and_basename_aliases() -> None:
    assert aliases_for_model("qwen", "/models/Qwen3-0.6B/") == [
        ("qwen", AliasOrigin.SERVED),
        ("/models/Qwen3-0.6B", AliasOrigin.PATH),
        ("Qwen3-0.6B", AliasOrigin.BASENAME),
    ]
    assert aliases_for_model("Qwen3-0.6B", "/models/Qwen3-0.6B") == [
        ("Qwen3-0.6B", AliasOrigin.SERVED),
        ("/models/Qwen3-0.6B", AliasOrigin.PATH),
    ]


def test_full_clean_normalises_the_url_and_refuses_a_duplicate(db) -> None:
    Node.objects.create(url="http://127.0.0.1:8100")
    node = Node(url="http://127.0.0.1:8100/")
    with pytest.raises(ValidationError) as excinfo:
        node.full_clean()
    assert "url" in excinfo.value.message_dict
    assert node.url == "http://127.0.0.1:8100"


def test_a_fresh_database_has_a_global_default_policy(db) -> None:
    assert RoutePolicy.objects.filter(model="").exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_a_node_url_with_a_bind_address_is_refused_with_a_clear_message(host: str) -> None:
    with pytest.raises(ValidationError) as raised:
        Node(url=f"http://{host}:8000").clean()
    assert "binds to" in str(raised.value)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"kind": "nanoctrl", "address": ""}, "address"),
        ({"kind": "direct", "address": "127.0.0.1:4479"}, "address"),
        ({"kind": "direct", "redis_url": "redis://h:6379/0"}, "redis_url"),
        ({"kind": "direct", "allowed_networks": ["10.0.0.0/8", "not-a-network"]}, "allowed_networks"),
        ({"kind": "direct", "allowed_networks": "10.0.0.0/8"}, "allowed_networks"),
    ],
)
def test_control_plane_validation_names_the_field(fields: dict, field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        ControlPlane(name="cp", **fields).clean()
    assert field in raised.value.message_dict


def test_allowed_networks_are_stored_in_their_canonical_form() -> None:
    plane = ControlPlane(name="cp", kind="direct", allowed_networks=["10.1.2.3/8", "fd00::1/8", "10.0.0.0/8", "::1"])
    plane.clean()
    assert plane.allowed_networks == ["10.0.0.0/8", "fd00::/8", "::1/128"]

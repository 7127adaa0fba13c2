"""The admin through Django's test client: list, filters, search, actions, forms."""

from __future__ import annotations

import re

import pytest
from django.contrib.admin.models import LogEntry
from django.test import Client

from nodes import services
from nodes.models import ApiKey, ChangeRecord, ControlPlane, ModelAlias, Node, hash_api_key

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_logged_in(client: Client, admin_user) -> Client:
    client.force_login(admin_user)
    return client


@pytest.fixture
def fleet(system) -> dict[str, Node]:
    return {
        "prefill": services.node_create(
            actor=system, url="http://p:1", role="prefill", models=["qwen"], engine_type="vllm"
        ),
        "decode": services.node_create(
            actor=system, url="http://d:1", role="decode", models=["qwen"], state="draining"
        ),
        "hybrid": services.node_create(actor=system, url="http://h:1", models=["llama"], health="unhealthy"),
    }


def listed_urls(html: str) -> set[str]:
    return set(re.findall(r'<th class="field-url"><a href="[^"]+">([^<]+)</a>', html))


def test_the_node_list_shows_badges_models_and_weight(admin_client_logged_in: Client, fleet) -> None:
    response = admin_client_logged_in.get("/admin/nodes/node/")
    assert response.status_code == 200
    html = response.content.decode()
    assert listed_urls(html) == {"http://p:1", "http://d:1", "http://h:1"}
    assert html.count('class="rp-badge"') >= 12  # role, state, health, source on every row
    assert ">Draining<" in html and ">Unhealthy<" in html and ">Prefill<" in html
    assert "qwen" in html and "llama" in html


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("role__exact=prefill", {"http://p:1"}),
        ("state__exact=draining", {"http://d:1"}),
        ("health__exact=unhealthy", {"http://h:1"}),
        ("engine_type__exact=vllm", {"http://p:1"}),
        ("source__exact=manual", {"http://p:1", "http://d:1", "http://h:1"}),
        ("q=llama", {"http://h:1"}),
        ("q=http://d", {"http://d:1"}),
    ],
)
def test_the_node_list_filters_and_searches(admin_client_logged_in: Client, fleet, query: str, expected) -> None:
    response = admin_client_logged_in.get(f"/admin/nodes/node/?{query}")
    assert response.status_code == 200
    assert listed_urls(response.content.decode()) == expected


@pytest.mark.parametrize(("action", "state"), [("drain_nodes", "draining"), ("disable_nodes", "disabled")])
def test_bulk_actions_change_state_through_services(admin_client_logged_in: Client, fleet, action, state) -> None:
    version = services.config_version_current()
    ids = [fleet["prefill"].pk, fleet["hybrid"].pk]
    response = admin_client_logged_in.post(
        "/admin/nodes/node/", {"action": action, "_selected_action": ids}, follow=True
    )
    assert response.status_code == 200
    assert set(Node.objects.filter(pk__in=ids).values_list("state", flat=True)) == {state}
    assert services.config_version_current() == version + 2
    assert ChangeRecord.objects.filter(via="admin", action="update", actor_label="root").count() == 2


def test_enable_action_puts_a_drained_node_back(admin_client_logged_in: Client, fleet) -> None:
    admin_client_logged_in.post(
        "/admin/nodes/node/", {"action": "enable_nodes", "_selected_action": [fleet["decode"].pk]}
    )
    fleet["decode"].refresh_from_db()
    assert fleet["decode"].state == "active"


def _node_form(**overrides) -> dict:
    data = {
        "url": "http://new-node:8000/",
        "name": "",
        "engine_type": "nanodeploy",
        "role": "hybrid",
        "state": "active",
        "weight": "1",
        "max_concurrency": "0",
        "bootstrap_port": "",
        "dp_size": "1",
        "kv_connector_address": "",
        "metadata": "{}",
        "aliases-TOTAL_FORMS": "1",
        "aliases-INITIAL_FORMS": "0",
        "aliases-MIN_NUM_FORMS": "0",
        "aliases-MAX_NUM_FORMS": "1000",
        "aliases-0-name": "qwen",
        "aliases-0-served_name": "qwen",
        "aliases-0-origin": "served",
    }
    data.update(overrides)
    return data


def test_adding_a_node_in_the_admin_is_audited_and_kept_in_admin_history(admin_client_logged_in: Client) -> None:
    version = services.config_version_current()
    response = admin_client_logged_in.post("/admin/nodes/node/add/", _node_form())
    assert response.status_code == 302, response.content.decode()[:2000]
    node = Node.objects.get()
    assert node.url == "http://new-node:8000"
    assert node.served_models == ["qwen"]
    assert ChangeRecord.objects.filter(via="admin", object_type="node", action="create").exists()
    assert ChangeRecord.objects.filter(via="admin", object_type="modelalias", action="create").exists()
    assert LogEntry.objects.filter(object_id=str(node.pk)).exists()
    assert services.config_version_current() > version


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"url": "not-a-url"}, "http:// or https://"), ({"weight": "-1"}, "greater than or equal to 0")],
)
def test_bad_node_input_in_the_admin_shows_the_error_and_stores_nothing(
    admin_client_logged_in: Client, overrides, message: str
) -> None:
    response = admin_client_logged_in.post("/admin/nodes/node/add/", _node_form(**overrides))
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not Node.objects.exists()
    assert not ModelAlias.objects.exists()


def test_a_duplicate_url_in_the_admin_is_refused(admin_client_logged_in: Client, fleet) -> None:
    response = admin_client_logged_in.post("/admin/nodes/node/add/", _node_form(url="http://p:1/"))
    assert response.status_code == 200
    assert "already exists" in response.content.decode()
    assert Node.objects.filter(url="http://p:1").count() == 1


def test_creating_an_api_key_in_the_admin_shows_it_once(admin_client_logged_in: Client) -> None:
    response = admin_client_logged_in.post(
        "/admin/nodes/apikey/add/",
        {"name": "app", "allowed_models": "[]", "rate_limit_rpm": "", "max_concurrent": "", "is_active": "on"},
        follow=True,
    )
    assert response.status_code == 200
    html = response.content.decode()
    plaintext = re.search(r"<code>(rp-[^<]+)</code>", html).group(1)
    key = ApiKey.objects.get()
    assert key.key_hash == hash_api_key(plaintext)
    again = admin_client_logged_in.get(f"/admin/nodes/apikey/{key.pk}/change/").content.decode()
    assert plaintext not in again


@pytest.mark.parametrize(
    "page",
    [
        "/admin/",
        "/admin/nodes/modelalias/",
        "/admin/nodes/routepolicy/",
        "/admin/nodes/controlplane/",
        "/admin/nodes/apikey/",
        "/admin/nodes/changerecord/",
        "/admin/nodes/controlplane/add/",
        "/admin/nodes/routepolicy/add/",
        "/admin/nodes/modelalias/add/",
    ],
)
def test_every_admin_page_renders(admin_client_logged_in: Client, fleet, page: str) -> None:
    assert admin_client_logged_in.get(page).status_code == 200


def test_the_admin_requires_a_login(client: Client) -> None:
    response = client.get("/admin/nodes/node/")
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_the_admin_header_links_to_the_dashboard(admin_client_logged_in: Client) -> None:
    html = admin_client_logged_in.get("/admin/").content.decode()
    assert '<a href="/dashboard/">Dashboard</a>' in html


def bulk_fleet(count: int) -> int:
    """``count`` registry-looking nodes with two aliases each, created in bulk (not through engines)."""
    plane = ControlPlane.objects.create(name="big", address="127.0.0.1:4479", scope="big")
    nodes = Node.objects.bulk_create(
        [
            Node(url=f"http://10.0.{i // 250}.{i % 250}:8000", control_plane=plane, health="healthy")
            for i in range(count)
        ]
    )
    ModelAlias.objects.bulk_create(
        [
            ModelAlias(node=node, name=name, served_name=f"model-{node.pk % 7}")
            for node in nodes
            for name in (f"model-{node.pk % 7}", f"alias-{node.pk % 7}")
        ]
    )
    return plane.pk


@pytest.mark.parametrize(
    "query", ["", "?p=5", "?state__exact=active", "?control_plane__id__exact={plane}", "?q=model-3", "?o=3"]
)
def test_the_node_list_at_a_thousand_nodes_pages_and_makes_as_many_queries_as_at_ten(
    admin_client_logged_in: Client, query: str
) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def page_queries(plane: int) -> tuple[int, str]:
        with CaptureQueriesContext(connection) as queries:
            response = admin_client_logged_in.get("/admin/nodes/node/" + query.format(plane=plane))
        assert response.status_code == 200
        return len(queries), response.content.decode()

    small, _ = page_queries(bulk_fleet(10))
    Node.objects.all().delete()
    ControlPlane.objects.all().delete()
    large, html = page_queries(bulk_fleet(1000))
    assert large == small <= 12  # no query per row: the aliases come in one prefetch
    rows = len(listed_urls(html))
    assert 0 < rows <= 100  # a page, not the fleet
    if not query:
        assert "1000 nodes" in html and "model-" in html

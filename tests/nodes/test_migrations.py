from __future__ import annotations

import io

import pytest
from django.core.management import call_command


@pytest.mark.django_db
def test_models_and_migrations_do_not_drift() -> None:
    out = io.StringIO()
    try:
        call_command("makemigrations", "--check", "--dry-run", stdout=out, stderr=out)
    except SystemExit as exc:  # makemigrations --check exits 1 when a migration is missing
        pytest.fail(f"models changed without a migration:\n{out.getvalue()} (exit {exc.code})")


@pytest.mark.django_db(transaction=True)
def test_the_input_rules_migration_stores_node_urls_in_one_spelling_and_goes_back(caplog) -> None:
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    before, after = [("nodes", "0005_control_plane_admission")], [("nodes", "0006_input_rules")]
    executor = MigrationExecutor(connection)
    try:
        executor.migrate(before)
        Node = executor.loader.project_state(before).apps.get_model("nodes", "Node")
        for url in ("http://localhost:9001", "http://127.0.0.1:9002", "http://127.1:9002", "http://10.0.0.5:80"):
            Node.objects.create(url=url)

        executor = MigrationExecutor(connection)
        executor.migrate(after)
        Node = executor.loader.project_state(after).apps.get_model("nodes", "Node")
        # 127.1:9002 is 127.0.0.1:9002, which another node has: left for the operator, and named.
        assert sorted(Node.objects.values_list("url", flat=True)) == [
            "http://10.0.0.5",
            "http://127.0.0.1:9001",
            "http://127.0.0.1:9002",
            "http://127.1:9002",
        ]
        assert "same backend as node" in caplog.text

        executor = MigrationExecutor(connection)
        executor.migrate(before)  # reversible: the URLs stay as they are
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())


@pytest.mark.django_db(transaction=True)
def test_keys_locked_out_by_max_concurrent_0_are_deactivated_not_opened() -> None:
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    before, after = [("nodes", "0006_input_rules")], [("nodes", "0007_key_max_concurrent_zero_is_no_limit")]
    executor = MigrationExecutor(connection)
    try:
        executor.migrate(before)
        ApiKey = executor.loader.project_state(before).apps.get_model("nodes", "ApiKey")
        ApiKey.objects.create(name="locked", key_hash="a" * 64, max_concurrent=0)
        ApiKey.objects.create(name="limited", key_hash="b" * 64, max_concurrent=3)

        executor = MigrationExecutor(connection)
        executor.migrate(after)
        apps = executor.loader.project_state(after).apps
        rows = (
            apps.get_model("nodes", "ApiKey")
            .objects.order_by("name")
            .values_list("name", "max_concurrent", "is_active")
        )
        assert list(rows) == [("limited", 3, True), ("locked", None, False)]
        record = apps.get_model("nodes", "ChangeRecord").objects.get()
        assert record.changes == {"max_concurrent": [0, None], "is_active": [True, False]}
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())

"""What one registry sync costs at fleet size, measured in process (``python bench/registry_sync.py``).

The sync is fed a listing of N entities (``--entities``, 5,000 by default) through its client's
``list_entities``, as NanoCtrl would answer it, on a fresh SQLite database in a temporary directory
(or the database ``DATABASE_URL`` names) with a private redis-server for the sync lock. It times,
and counts the queries of: a sync of N new entities, a sync of the same N unchanged, a sync with 50
of them changed (role and served model), then the event path (``registry_apply_entity``: one
registry event) for one changed entity.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TMP = tempfile.mkdtemp(prefix="rp-bench-sync-")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "routerpanel.settings")
os.environ.setdefault("ROUTERPANEL_SQLITE_PATH", str(Path(TMP) / "bench.sqlite3"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


REDIS_PORT = _free_port()
os.environ["ROUTERPANEL_REDIS_URL"] = f"redis://127.0.0.1:{REDIS_PORT}/0"

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402

from nodes import services  # noqa: E402
from nodes.registry import NanoCtrlClient, RegistryEntity, parse_entity  # noqa: E402


class Listing(NanoCtrlClient):
    """Stands in for NanoCtrl: answers ``list_entities`` with the entities it holds."""

    def __init__(self, entities: list[dict[str, Any]]) -> None:
        super().__init__("127.0.0.1:1")
        self.entities = entities

    def list_entities(self, *, kind: str, scope: str) -> tuple[list[RegistryEntity], list[str]]:
        return [parse_entity(e) for e in self.entities if e["kind"] == kind], []


def entity(index: int, *, role: str = "hybrid", served: str = "qwen") -> dict[str, Any]:
    host = f"10.{index // 65536}.{index // 256 % 256}.{index % 256}"
    return {
        "entity_id": f"nanodeploy-{host}:8000",
        "entity_type": "service",
        "kind": "nanodeploy",
        "endpoint": {"host": host, "port": 8000, "protocol": "http"},
        "metadata": {"served_model_name": served, "model_path": f"/models/{served}-8B", "role": role},
    }


class QueryCount:
    """Counts the queries run inside ``with count():`` (Django's ``CaptureQueriesContext`` keeps only
    the last 9,000, fewer than a per-row sync of 5,000 entities runs)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        self.count += 1
        return execute(sql, params, many, context)

    def __len__(self) -> int:
        return self.count


@contextlib.contextmanager
def count_queries() -> Iterator[QueryCount]:
    counter = QueryCount()
    with connection.execute_wrapper(counter):
        yield counter


def measure(label: str, control_plane_id: int, listing: Listing) -> None:
    with count_queries() as queries:
        started = time.perf_counter()
        result = services.registry_sync(control_plane_id=control_plane_id, client=listing)
        elapsed = time.perf_counter() - started
    assert result.ok, result.reason
    counts = {k: v for k, v in result.counts().items() if v}
    print(f"{label:<28} {elapsed * 1000:9.0f} ms {len(queries):7d} queries   {counts}")


def measure_event(control_plane_id: int, payload: dict[str, Any], repeat: int) -> None:
    from nodes.models import ControlPlane

    control_plane = ControlPlane.objects.get(pk=control_plane_id)
    timings: list[float] = []
    counted = 0
    for i in range(repeat):
        role = "prefill" if i % 2 == 0 else "decode"
        changed = parse_entity({**payload, "metadata": {**payload["metadata"], "role": role}})
        with count_queries() as queries:
            started = time.perf_counter()
            services.registry_apply_entity(control_plane=control_plane, entity=changed, now=timezone.now())
            timings.append(time.perf_counter() - started)
        counted = len(queries)
    timings.sort()
    print(f"{'event: one entity changed':<28} {timings[len(timings) // 2] * 1000:9.1f} ms {counted:7d} queries")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--entities", type=int, default=5000)
    parser.add_argument("--changed", type=int, default=50)
    parser.add_argument("--events", type=int, default=21, help="events timed (the median is printed)")
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is needed for the sync lock")
    redis = subprocess.Popen(
        [binary, "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    try:
        call_command("migrate", verbosity=0)
        plane = services.control_plane_create(actor=services.Actor.system("bench"), name="bench", address="x:1")
        n = args.entities
        print(f"registry sync of {n} entities on {connection.vendor}")
        listing = Listing([entity(i) for i in range(n)])
        measure(f"{n} new", plane.pk, listing)
        measure(f"{n} unchanged", plane.pk, listing)
        changed = set(range(0, n, max(1, n // args.changed)))
        listing = Listing([entity(i, role="decode", served="llama") if i in changed else entity(i) for i in range(n)])
        measure(f"{n}, {len(changed)} changed", plane.pk, listing)
        measure_event(plane.pk, entity(1), args.events)
    finally:
        redis.terminate()
        redis.wait()
        shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()

"""What a web worker leaves out of its memory: optional packages that its libraries import when they
are installed, for features the worker never uses (docs/decisions/0011-lean-web-worker.md).

- DRF's compatibility module (``rest_framework.compat``, imported with the first REST API request)
  imports ``django.contrib.postgres``'s fields, and with them psycopg (about 10 MB), even when the
  database is SQLite; it only maps PostgreSQL's field types (RouterPanel's models have none). On
  PostgreSQL the database backend loads psycopg anyway, and nothing is left out.
- It also imports requests (for DRF's test client, about 4.5 MB) and Pygments (for Markdown
  descriptions, which need ``markdown``, not installed): neither is a dependency of RouterPanel's,
  but the test tools install them.

``web_worker_imports`` hides them while Django sets up and while DRF's compatibility module is
first imported, so that module takes the branch it takes when they are not installed. The packages
stay importable afterwards: whatever imports one later gets it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# What the web worker never needs, on any database.
NEVER_IN_A_WEB_WORKER = ("requests", "pygments")
# PostgreSQL's model fields, which import psycopg; needed only where the database is PostgreSQL.
POSTGRES_FIELDS = "django.contrib.postgres.fields"


@contextmanager
def optional_imports_absent(names: tuple[str, ...]) -> Iterator[None]:
    """Within the block, ``import name`` raises ImportError for each of ``names`` not yet imported
    (a ``None`` in ``sys.modules`` is how Python marks a module as unavailable); restored after."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]


def left_out(database_engine: str) -> tuple[str, ...]:
    """The packages a web worker on ``database_engine`` (a Django ``ENGINE`` path) leaves out."""
    if "postgresql" in database_engine:
        return NEVER_IN_A_WEB_WORKER
    return (*NEVER_IN_A_WEB_WORKER, POSTGRES_FIELDS)


@contextmanager
def web_worker_imports() -> Iterator[None]:
    """Django's set-up (within the block), then DRF's compatibility module, without what this
    worker's database does not need (DRF decides once, at that import, what is installed)."""
    from django.conf import settings

    with optional_imports_absent(left_out(settings.DATABASES["default"]["ENGINE"])):
        yield
        importlib.import_module("rest_framework.compat")

"""Tasks the data path makes, named as they are made.

On Python 3.11 a task created without a name formats one (``Task-<n>``: 1.45 k instructions, a
third of a percent of a proxied request's), and uvloop's ``create_task(name=...)`` formats it before
renaming the task (docs/architecture.md). Nothing of this imports Django: the HTTP edge loads it
before the application.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def named_task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
    """``loop.create_task(coro, name=name)``, without a name formatted first; an installed task
    factory still makes the task."""
    if loop.get_task_factory() is None:
        return asyncio.Task(coro, loop=loop, name=name)
    return loop.create_task(coro, name=name)

"""The live state RouterPanel's processes share through Redis: every key name and every codec.

The web workers (``proxy``) write most of it and read each other's; the dashboard, the admin and
the Celery tasks read it; the registry services write the configuration version and take locks.
Nothing here is the source of truth: the database is, and Redis being down must never fail a
request or a write. See docs/architecture.md and docs/decisions/0005-counters-shared-through-redis.md.

- ``keys``: the names of every shared key and channel, and a worker's identity.
- ``workers``: the one registry of the web workers.
- ``connection``: the process-wide blocking Redis client for Django code (short timeouts).
- ``config_version``: publishing the configuration version after a registry change.
- ``breakers``: the circuit-breaker hash's record and codec, and reading the states per node.
- ``stats``: the per-worker statistics snapshots (their shape, writing, reading and merging).
- ``explain``: the request explanations' record and codec; ``explain_store`` reads them back.
- ``budgets``: the API keys' token counters per minute and per day (their windows and a key's use).
"""

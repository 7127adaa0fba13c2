"""The data path: an OpenAI-compatible proxy in front of engine fleets.

A lean ASGI app (no Django request handling) serves ``/v1/*``, ``/health`` and ``/metrics``;
``routerpanel.asgi`` mounts it in front of Django. Modules, in request order:

- ``mount``      path dispatch: data-path URLs here, the rest to Django / Channels
- ``app``        the ASGI app: endpoints, API-key check, request parsing, error responses
- ``transport``  ASGI plumbing: headers, body with a size limit, the client-disconnect watcher
- ``snapshot``   the immutable per-process routing table (nodes, aliases, policies, keys)
- ``watcher``    rebuilds the snapshot off the hot path when the configuration version moves
- ``router``     picks a node for a route and role; ``strategies`` are the pure functions it uses
- ``load``       in-flight counters and latency per node, per-key limits; ``shared`` shares them
- ``request``    the parsed client request and its outcome
- ``attempts``   the one attempt loop: pick, send, retry before the first byte, verdict, release, record
- ``hybrid``     one node answers: the attempt loop with plain OpenAI requests
- ``relay``      passes an engine's SSE stream back as it arrives
- ``pd``         prefill/decode pairs: per-engine protocols, both legs, KV released on every path
- ``upstream``   the pool of engine connections per event loop (``httpclient``)
- ``errors``, ``sse``, ``metrics``: helpers
"""

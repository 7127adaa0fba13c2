"""Active health checks: the prober (``manage.py run_prober``), one long-lived process per deployment.

It probes each active or draining node's ``GET /health`` on the node's own interval (spread over the
interval with jitter, never in bursts), with keep-alive connections and a bound on probes in flight,
and publishes node health as live state through Redis (``nodes.live.health``): no audit record, no
configuration version, no snapshot rebuild per probe. It measures its own event loop and lets no
probe decide anything that its own trouble could explain.

- ``schedule``    when each node is probed (pure)
- ``hysteresis``  a node's state machine (pure)
- ``verdicts``    what a result says, given the prober's own loop lag (pure)
- ``client``      the aiohttp session and one probe
- ``targets``     which nodes, with which settings (the database), and the database mirror
- ``runner``      dispatching, judging, keeping the states
- ``publish``     what a flush writes to Redis
- ``process``     the process: lease, node list, "probe now", flushes, status

See docs/decisions/0008-health-as-live-state.md.
"""

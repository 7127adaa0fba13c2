"""Request explanations on the data path: what the router and the attempt loop decided for one
request, kept cheaply while it runs and flushed to Redis by the worker's background loop.

The hot path only appends what is already at hand (docs/architecture.md, "Request explanations"):

- ``Router.choose`` hands over the nodes its filter leaves out by reason, naming a few per reason
  and counting the rest, found among the few nodes that can be left out (already tried, at a
  concurrency limit, behind a breaker: ``Router.left_out``) rather than by walking the route, which
  may have a thousand nodes. The nodes out of rotation (draining, disabled, unhealthy...) are the
  snapshot's, so they are worked out off the hot path, once per route (``record._route_excluded``).
- Only the pick and the next ``LISTED_CANDIDATES - 1`` available nodes after it in route order get
  their figures read (in flight, weight, latency, prefix match), into one flat tuple per choice.
- The attempt loop adds one tuple per attempt; the answer's usage is a slice of bytes already read.
- Those tuples hold plain values only (ids, URLs, numbers, strings: never a node or an enum), so the
  garbage collector stops tracking them at its first pass, and they are already in the wire layout
  (``nodes.live.explain``): the record is dumped as it is.

``Explainer.finish``, once the answer went out, dumps the finished record as JSON and appends the
bytes to an in-memory buffer (bounded: when Redis has been away long enough to fill it, records are
dropped and counted, and the request never notices). Encoding it then rather than at the flush is what
keeps the records cheap: a record waiting as objects (the ``Explanation`` and its tuples, about six
per request) was most of what the garbage collector's young passes found alive under load, and made
them run several times as often; bytes and strings are nothing it tracks, and the record's objects
are freed with the request.
``Explainer.flush``, called by ``proxy.shared.SharedCounters``'s loop, appends a batch to the
stream in one call.
"""

from .buffer import Explainer
from .record import HEADER, Explanation

__all__ = ["HEADER", "Explainer", "Explanation"]

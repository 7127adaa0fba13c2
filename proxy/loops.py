"""RouterPanel never proxies to itself: every request it sends to a node carries this deployment's
hop marker, and a request that arrives with it is a loop (a node registered with RouterPanel's own
URL, or two deployments pointing at each other): ``508 Loop Detected`` at once, instead of the
request going round until something times out.

The marker is ``X-RouterPanel-Hop: <id>[, <id> ...]``: the deployments a request went through, this
one's id appended, so a loop through another RouterPanel is caught too. The id
(``ROUTERPANEL_DEPLOYMENT_ID``) is the same in every process of one deployment (derived from its
secret key, database and Redis unless set) and tells nothing about them.
"""

from __future__ import annotations

from .errors import ProxyError

HOP_HEADER = "X-RouterPanel-Hop"
# More hops than this is a loop through deployments that do not know each other's ids (or a client
# playing games): refused the same way.
MAX_HOPS = 8


def hop_value(deployment: str, arrived: bytes | None) -> str:
    """The marker to send on: the deployments the request went through, then this one."""
    if arrived is None:
        return deployment
    return f"{arrived.decode('latin-1')}, {deployment}"


def check_hops(deployment: str, arrived: bytes) -> None:
    """508 when a request that arrived with a hop marker already went through this deployment."""
    hops = [hop.strip() for hop in arrived.decode("latin-1").split(",")]
    if deployment in hops:
        raise ProxyError(
            508,
            "Loop detected: this request was sent by this RouterPanel deployment to itself "
            "(is one of the model's nodes RouterPanel's own URL?).",
            "loop_detected",
        )
    if len(hops) >= MAX_HOPS:
        raise ProxyError(508, f"Loop detected: the request went through {len(hops)} RouterPanels.", "loop_detected")

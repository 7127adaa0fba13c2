"""The data path's HTTP/1.1 client (the attempt loop's, and the PD side calls': KV frees, LMDeploy's
link): one request at a time per kept-alive connection, parsed by httptools (uvicorn's parser).

aiohttp's ``ClientSession`` costs about 100 µs of CPU per request on this path (a request object,
URL parsing, multidicts, a cookie jar, a payload writer, a timer per request...), more than the rest
of the proxy together; this client writes the request in one write, at the loop's next turn with the
others of this one (``proxy.writes``), and hands the answer over as bytes: a status, headers, and a
body complete (``read``) or as it arrives (``content.readany``, ``iter_any``). The prober keeps aiohttp.

Errors are aiohttp's, so callers keep one vocabulary (``proxy.upstream.CONNECT_ERRORS``): a node that cannot
be reached raises ``ClientOSError`` (``ConnectionTimeoutError`` past the connect timeout), a connection closed
before the answer's head ``ServerDisconnectedError`` (one retry on a new connection when it was a kept-alive
one the engine had just closed), a body cut short ``ClientPayloadError``; the total timeout ``TimeoutError``.
"""

from .connections import Pool
from .response import Response

__all__ = ["Pool", "Response"]

"""The HTTP/1.1 server: an asyncio Protocol on httptools, under uvloop where it is available.

Public names: ``Request``, ``Responder``, ``Handler``, ``HttpLimits``, ``HttpServer``, ``Rejection`` and
``install_event_loop_policy``. It must never know about routes,
callers or policy: a handler receives each request and answers it.
"""

from appliance.http.cycle import Handler, Request, Responder
from appliance.http.limits import HttpLimits
from appliance.http.server import HttpServer, Rejection, install_event_loop_policy

__all__ = [
    "Handler",
    "HttpLimits",
    "HttpServer",
    "Rejection",
    "Request",
    "Responder",
    "install_event_loop_policy",
]

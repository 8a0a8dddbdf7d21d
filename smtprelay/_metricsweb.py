"""
The HTTP side of L{smtprelay.metrics}: the C{/metrics} and C{/healthz}
resource and a quiet site to serve it.  Kept apart because
C{twisted.web.server} costs a few megabytes of memory that a relay without
a C{metrics} listener never needs; L{smtprelay.metrics} imports this module
only when metrics are served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.web.resource import NoResource, Resource
from twisted.web.server import Request, Site

if TYPE_CHECKING:
    from .metrics import Metrics


class MetricsResource(Resource):
    """
    C{/metrics}; C{/healthz}: 200 while C{serving()} says the relay serves,
    else 503 (a reply at all shows the reactor turns); 404 for every other
    path.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics, serving: Callable[[], bool]) -> None:
        super().__init__()
        self._metrics = metrics
        self._serving = serving

    def render_GET(self, request: Request) -> bytes:
        if request.path == b"/healthz":
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            if self._serving():
                return b"serving\n"
            request.setResponseCode(503)
            return b"not serving\n"
        if request.path != b"/metrics":
            return NoResource().render(request)  # type: ignore[no-any-return]
        body, contentType = self._metrics.exposition()
        request.setHeader(b"content-type", contentType.encode("ascii"))
        return body


class QuietSite(Site):
    """
    A site without access log lines: a scrape every few seconds is noise.
    """

    noisy = False

    def log(self, request: Any) -> None:
        pass

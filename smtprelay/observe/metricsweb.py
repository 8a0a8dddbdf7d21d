"""
The HTTP side of L{smtprelay.observe.metrics}: the C{/metrics}, C{/healthz} and
C{/readyz} resource and a quiet site to serve it.  Kept apart because
C{twisted.web.server} costs a few megabytes of memory that a relay without a
C{metrics} listener never needs; L{smtprelay.observe.metrics} imports this module
only when metrics are served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.web.resource import NoResource, Resource
from twisted.web.server import Request, Site

if TYPE_CHECKING:
    from smtprelay.observe.metrics import Metrics, Readiness


class MetricsResource(Resource):
    """
    C{/metrics}; C{/healthz}: 200 while C{serving()} says the relay serves,
    else 503 (a reply at all shows the reactor turns); C{/readyz} (when
    C{readiness} is given): 200 or 503 as C{readiness()} says, with its
    text; 404 for every other path.
    """

    isLeaf = True

    def __init__(
        self, metrics: Metrics, serving: Callable[[], bool], readiness: Readiness | None = None
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._serving = serving
        self._readiness = readiness

    def render_GET(self, request: Request) -> bytes:
        if request.path == b"/healthz":
            serving = self._serving()
            return _check(request, serving, b"serving\n" if serving else b"not serving\n")
        if request.path == b"/readyz" and self._readiness is not None:
            ready, text = self._readiness()
            return _check(request, ready, text.encode("utf-8"))
        if request.path != b"/metrics":
            return NoResource().render(request)
        body, contentType = self._metrics.exposition()
        request.setHeader(b"content-type", contentType.encode("ascii"))
        return body


def _check(request: Request, ok: bool, text: bytes) -> bytes:
    """
    A health check's answer: C{text}, with 200 when C{ok}, else 503.
    """
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    if not ok:
        request.setResponseCode(503)
    return text


class QuietSite(Site):
    """
    A site without access log lines: a scrape every few seconds is noise.
    """

    noisy = False

    def log(self, request: Any) -> None:
        pass

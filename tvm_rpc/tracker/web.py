"""The tracker's HTTP side (C{--http}): the status page at C{/}, the same
status as JSON at C{/api/summary}, and Prometheus metrics at C{/metrics}."""

import json

from twisted.web.resource import Resource

from ..daemon.http import MetricsResource, secure
from .metrics import tracker_registry
from .page import DEFAULT_REFRESH, render_page
from .status import tracker_status

#: The longest reload period a page may ask for with C{?refresh=}.
MAX_REFRESH = 3600


def refresh_period(request):
    """
    @return: the reload period asked for with C{?refresh=SECONDS} (C{0}: no
        reload, as L{None}), or the default when absent or not a number.
    """
    values = request.args.get(b"refresh")
    if not values:
        return DEFAULT_REFRESH
    try:
        seconds = int(values[0])
    except ValueError:
        return DEFAULT_REFRESH
    return min(seconds, MAX_REFRESH) if seconds > 0 else None


def _html(status, request):
    """@return: the status page, with the reload period the request asks for."""
    return render_page(status, refresh_period(request))


def _json(status, request):
    """@return: the status as UTF-8 JSON."""
    # "<" escaped as JSON allows, so no peer-supplied key reads as markup to
    # anything that sniffs or embeds the document.
    return json.dumps(status).replace("<", "\\u003c").encode("utf-8")


class StatusResource(Resource):
    """
    The status of a L{tvm_rpc.tracker.state.TrackerState}, built at each
    GET and rendered by C{render(status, request)} as C{content_type}.
    """

    isLeaf = True

    def __init__(self, state, content_type, render):
        """See the class docstring for the parameters."""
        super().__init__()
        self.state = state
        self.content_type = content_type
        self.render_status = render

    def render_GET(self, request):
        """@return: the status, rendered now."""
        secure(request, self.content_type)
        return self.render_status(tracker_status(self.state), request)


def tracker_web_root(state):
    """
    @param state: the tracker's L{tvm_rpc.tracker.state.TrackerState}.
    @return: the root L{Resource} of the tracker's HTTP port, with its own
        Prometheus registry.
    """
    root = Resource()
    root.putChild(b"", StatusResource(state, b"text/html; charset=utf-8", _html))
    api = Resource()
    api.putChild(b"summary", StatusResource(state, b"application/json", _json))
    root.putChild(b"api", api)
    root.putChild(b"metrics", MetricsResource(tracker_registry(state)))
    return root

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


class StatusPage(Resource):
    """C{/}: the status page of a L{tvm_rpc.tracker.state.TrackerState}."""

    isLeaf = True

    def __init__(self, state):
        """@param state: the tracker's state."""
        super().__init__()
        self.state = state

    def render_GET(self, request):
        """@return: the page, rendered now."""
        secure(request, b"text/html; charset=utf-8")
        return render_page(tracker_status(self.state), refresh_period(request))


class StatusJSON(Resource):
    """C{/api/summary}: the status as JSON (SUMMARY's fields and more)."""

    isLeaf = True

    def __init__(self, state):
        """@param state: the tracker's state."""
        super().__init__()
        self.state = state

    def render_GET(self, request):
        """@return: the status as UTF-8 JSON."""
        secure(request, b"application/json")
        # "<" escaped as JSON allows, so no peer-supplied key reads as markup
        # to anything that sniffs or embeds the document.
        text = json.dumps(tracker_status(self.state)).replace("<", "\\u003c")
        return text.encode("utf-8")


def tracker_web_root(state):
    """
    @param state: the tracker's L{tvm_rpc.tracker.state.TrackerState}.
    @return: the root L{Resource} of the tracker's HTTP port, with its own
        Prometheus registry.
    """
    root = Resource()
    root.putChild(b"", StatusPage(state))
    api = Resource()
    api.putChild(b"summary", StatusJSON(state))
    root.putChild(b"api", api)
    root.putChild(b"metrics", MetricsResource(tracker_registry(state)))
    return root

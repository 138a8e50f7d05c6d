"""A daemon's HTTP port: a L{twisted.web} site behind the same listener as
its other ports, and the C{/metrics} resource of a Prometheus registry.

The port is bound like C{--listen}'s (a Twisted endpoint string, a failed
bind is fatal, the bound address announced as C{"<name> listening on
host:port"}). Requests are not logged: a status page that reloads itself and
a Prometheus scraper would fill the log with lines nobody reads.
"""

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import endpoints
from twisted.web.resource import Resource
from twisted.web.server import Site

from .listening import ListenerService, with_backlog
from .ports import GuardedListenReactor

#: Headers of every page served: no script, style or frame from anywhere
#: (the pages need none, and peer-supplied strings end up in them).
SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'none'; style-src 'unsafe-inline'; "
                                b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-store",
}


def secure(request, content_type):
    """Set C{content_type} and L{SECURITY_HEADERS} on C{request}."""
    request.setHeader(b"content-type", content_type)
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)


class QuietSite(Site):
    """A L{Site} that writes no access log line (nor its start and stop lines)."""

    noisy = False

    def log(self, request):
        """Log nothing (see the module docstring)."""


class MetricsResource(Resource):
    """C{/metrics}: a L{prometheus_client.CollectorRegistry} in Prometheus' text format."""

    isLeaf = True

    def __init__(self, registry):
        """@param registry: the registry scraped at each request."""
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        """@return: the registry's metrics, rendered now."""
        secure(request, CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class MetricsIndex(Resource):
    """C{/} of a metrics-only HTTP port: one link to C{/metrics}."""

    isLeaf = True

    def render_GET(self, request):
        """@return: a tiny HTML page linking to C{/metrics}."""
        secure(request, b"text/html; charset=utf-8")
        return b'<!doctype html><title>metrics</title><a href="metrics">/metrics</a>\n'


def metrics_root(registry):
    """
    @param registry: the daemon's own L{prometheus_client.CollectorRegistry}.
    @return: the root L{Resource} of a daemon whose C{--http} serves its
        metrics only: C{/metrics}, and C{/} linking to it.
    """
    root = Resource()
    root.putChild(b"", MetricsIndex())
    root.putChild(b"metrics", MetricsResource(registry))
    return root


def serve_metrics(reactor, top, registry, name, descriptions):
    """
    Add the C{--http} listener of a metrics-only daemon to its service.

    @param top: the daemon's L{twisted.application.service.MultiService};
        the listener becomes its child C{"http"}.
    @param registry: what C{/metrics} serves.
    @param name: what listens, for the announcement (C{"rpc-proxy http"}).
    @param descriptions: the C{--http} endpoint strings.
    @return: the listener.
    """
    http = http_listener(reactor, metrics_root(registry), name, descriptions)
    http.setName("http")
    http.setServiceParent(top)
    return http


def http_listener(reactor, root, name, descriptions):
    """
    @param reactor: the reactor; its ports are guarded against running out
        of descriptors.
    @param root: the site's root L{Resource}.
    @param name: what listens, for the announcement (C{"rpc-tracker http"}).
    @param descriptions: Twisted endpoint strings (C{tcp:8080:interface=127.0.0.1}).
    @return: a L{ListenerService} serving C{root} on every endpoint.
    """
    guarded = GuardedListenReactor(reactor)
    candidates = [endpoints.serverFromString(guarded, with_backlog(d)) for d in descriptions]
    return ListenerService(candidates, QuietSite(root), name, first_only=False)

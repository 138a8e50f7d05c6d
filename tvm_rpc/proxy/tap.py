"""C{twistd rpc-proxy}: command-line options and the service they build.

The flags are TVM's C{python -m tvm.exec.rpc_proxy} flags (C{--host},
C{--port}, C{--port-end}, C{--web-port}, C{--tracker}, C{--example-rpc}) plus C{--listen}
(Twisted endpoint strings, repeatable), C{--timeout-client},
C{--timeout-server}, C{--handshake-timeout}, C{--relay-buffer} and
C{--http} (Prometheus metrics).
"""

import importlib.util

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from ..daemon.listening import endpoint_kind, listener_service
from ..daemon.logfile import LogFileOptions, under_twistd
from ..daemon.logs import set_silent
from ..daemon.options import (
    ListenOptions,
    MetricsHttpOptions,
    listen_parameters,
    parse_address,
    port_number,
    positive_float,
)
from ..transport import PEER_HANDSHAKE_TIMEOUT
from .pairing import DEFAULT_TIMEOUT, PairingPool
from .protocol import ProxyFactory
from .relay import RELAY_CHUNK
from .tuning import AllocatorTuning

log = Logger()

#: TVM's default websocket port.
WEB_PORT = 8888


def _buffer_size(value):
    """Coerce an option to a relay buffer size in bytes."""
    number = int(value)
    if not 4096 <= number <= 64 * 1024 * 1024:
        raise ValueError(f"{value} is not between 4096 and 67108864 bytes")
    return number


class Options(ListenOptions, MetricsHttpOptions, LogFileOptions, usage.Options):
    """The options of C{twistd rpc-proxy}."""

    synopsis = "[options]"
    longdesc = (
        "Run a TVM RPC proxy: clients and servers that present the same key are "
        "paired and their bytes relayed with backpressure. With --tracker, each "
        "server behind the proxy is registered with the tracker under a fresh "
        "matchkey."
    )
    optParameters = listen_parameters(
        "127.0.0.1", 9090, host_help="Address to listen on (also for --web-port)."
    ) + [
        ["web-port", None, None, "Websocket port serving /ws on --host; 0 turns it off "
         "(default: 8888, as TVM's, when autobahn is installed: pip install 'tvm_rpc[web]').",
         port_number],
        ["tracker", None, None, "Register the servers behind the proxy with this tracker "
         "(HOST:PORT)."],
        ["timeout-client", None, DEFAULT_TIMEOUT, "Seconds a client waits for its server.",
         positive_float],
        ["timeout-server", None, DEFAULT_TIMEOUT,
         "Seconds a server waits for its client (plain mode).", positive_float],
        ["handshake-timeout", None, PEER_HANDSHAKE_TIMEOUT,
         "Seconds a new connection has to send its handshake.", positive_float],
        ["example-rpc", None, "",
         "TVM's flag: serve TVM's web RPC example (web/dist of a TVM source tree) on the "
         "web port. Accepted and refused at start: neither tvm_rpc nor TVM's wheel ships "
         "those pages. Any non-empty value turns it on, as TVM's type=bool does."],
        ["relay-buffer", None, RELAY_CHUNK,
         "Bytes per read and outgoing buffer limit per connection.", _buffer_size],
    ]
    optFlags = [
        ["no-splice", None, "Relay plain TCP pairs through Twisted instead of splice(2) "
         "(for debugging)."],
    ]

    def postOptions(self):
        """Check the port range, the endpoint strings, the websocket port and the tracker address."""
        self.check_listen()
        self.check_http()
        if self["example-rpc"]:
            # What TVM 0.27's own proxy does too: without a TVM source tree's
            # web/dist it stops at start ("Cannot find .../tvmjs.bundle.js").
            raise usage.UsageError(
                "--example-rpc serves TVM's web RPC example pages (web/dist, built in a "
                "TVM source tree); tvm_rpc's proxy does not serve them, and TVM's wheel has "
                "none (its own proxy stops at start): serve the pages with a web server, "
                "and point their websocket at this proxy's /ws"
            )
        has_websocket = importlib.util.find_spec("autobahn") is not None
        self["web-port-implicit"] = self["web-port"] is None
        if self["web-port"] is None:
            self["web-port"] = WEB_PORT
        elif self["web-port"] and not has_websocket:
            raise usage.UsageError(
                "--web-port needs autobahn, which is not installed: "
                "pip install 'tvm_rpc[web]', or --web-port 0"
            )
        if self["tracker"] is not None:
            try:
                self["tracker-address"] = parse_address(self["tracker"], "--tracker")
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
            kinds = {endpoint_kind(d) for d in self["listen"]}
            if self["listen"] and not kinds & {"tcp", "tcp6", "ssl"}:
                raise usage.UsageError("--tracker needs a TCP listener: the tracker hands "
                                       "out the proxy's port")
        else:
            self["tracker-address"] = None


def makeService(options, reactor=None):
    """
    Build the proxy service.

    @param options: parsed L{Options}.
    @param reactor: the reactor to use; the global one when L{None}.
    @return: a L{service.MultiService} whose children are the allocator
        tuning (L{tvm_rpc.proxy.tuning}), the RPC listener (a
        L{tvm_rpc.daemon.listening.ListenerService}, as is the websocket one),
        the websocket listener (when C{--web-port} is not 0) and the tracker
        registration (with C{--tracker}) and, with C{--http}, the metrics
        listener (child C{"http"}). It carries C{pool} and C{listener}
        attributes.
    """
    if reactor is None:
        from twisted.internet import reactor
    set_silent(False, options["verbose"])
    tracker = options["tracker-address"]
    pool = PairingPool(
        reactor,
        timeout_client=options["timeout-client"],
        timeout_server=options["timeout-server"],
        tracker_mode=tracker is not None,
    )
    tuning = AllocatorTuning(options["relay-buffer"], reactor)
    factory = ProxyFactory(pool, reactor, options["handshake-timeout"], options["relay-buffer"],
                           tuning.pair_ended, splice=not options["no-splice"])
    top = service.MultiService()
    tuning.setName("allocator")
    tuning.setServiceParent(top)
    listener = listener_service(
        reactor, factory, "rpc-proxy", host=options["host"], port=options["port"],
        port_end=options["port-end"], listen=options["listen"],
    )
    listener.setName("rpc")
    listener.setServiceParent(top)
    if options["web-port"] and options.get("web-port-implicit") and \
            importlib.util.find_spec("autobahn") is None:
        log.warn("no websocket port: autobahn is not installed (pip install 'tvm_rpc[web]')")
    elif options["web-port"]:
        from .web import ProxyWebSocketFactory

        web_factory = ProxyWebSocketFactory(pool, reactor, options["handshake-timeout"],
                                            tuning.pair_ended)
        web = listener_service(
            reactor, web_factory, "rpc-proxy websocket /ws", host=options["host"],
            port=options["web-port"], port_end=options["web-port"] + 1,
        )
        web.setName("web")
        web.setServiceParent(top)
    if tracker is not None:
        from ..client.tracker import tracker_endpoint
        from .registration import ProxyRegistration, link_settings

        host, port = tracker
        registration = ProxyRegistration(
            tracker_endpoint(reactor, host, port), pool, reactor, listener.port_number,
            settings=link_settings(f"{host}:{port}"))
        pool.observer = registration
        registration.setName("tracker")
        registration.setServiceParent(top)
    if options["http"]:
        # Imported here: twisted.web and prometheus_client load only when asked for.
        from ..daemon.http import serve_metrics
        from .metrics import proxy_registry

        serve_metrics(reactor, top, proxy_registry(pool), "rpc-proxy http", options["http"])
    top.pool = pool
    top.listener = listener
    return under_twistd(options, top)

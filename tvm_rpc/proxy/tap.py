"""``twistd rpc-proxy``: command-line options and the service they build.

The flags are TVM's ``python -m tvm.exec.rpc_proxy`` flags (``--host``,
``--port``, ``--port-end``, ``--web-port``, ``--tracker``) plus ``--listen``
(Twisted endpoint strings, repeatable), ``--timeout-client``,
``--timeout-server``, ``--handshake-timeout`` and ``--relay-buffer``.
"""

import ipaddress

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from .pairing import DEFAULT_TIMEOUT, PairingPool
from .protocol import DEFAULT_HANDSHAKE_TIMEOUT, ProxyFactory
from .relay import RELAY_CHUNK
from .tuning import AllocatorTuning

log = Logger(namespace="tvm_rpc.proxy")


def _port_number(value):
    """Coerce an option to a TCP port number."""
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"{value} is not a port number")
    return number


def _seconds(value):
    """Coerce an option to a positive, finite number of seconds."""
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{value} is not a positive number of seconds")
    return number


def _buffer_size(value):
    """Coerce an option to a relay buffer size in bytes."""
    number = int(value)
    if not 4096 <= number <= 64 * 1024 * 1024:
        raise ValueError(f"{value} is not between 4096 and 67108864 bytes")
    return number


def parse_tracker_address(text):
    """
    @param text: ``HOST:PORT`` (``[v6]:PORT`` for IPv6 literals).
    @return: C{(host, port)}.
    @raise ValueError: when C{text} is not of that form.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"tracker address {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, _port_number(port)


class Options(usage.Options):
    """The options of ``twistd rpc-proxy``."""

    synopsis = "[options]"
    longdesc = (
        "Run a TVM RPC proxy: clients and servers that present the same key are "
        "paired and their bytes relayed with backpressure. With --tracker, each "
        "server behind the proxy is registered with the tracker under a fresh "
        "matchkey."
    )
    optParameters = [
        ["host", None, "127.0.0.1", "Address to listen on (also for --web-port)."],
        ["port", None, 9090, "First port to try.", _port_number],
        ["port-end", None, 9199, "End of the port range (exclusive).", _port_number],
        ["web-port", None, 8888, "Websocket port serving /ws on --host; 0 turns it off.",
         _port_number],
        ["tracker", None, None, "Register the servers behind the proxy with this tracker "
         "(HOST:PORT)."],
        ["timeout-client", None, DEFAULT_TIMEOUT, "Seconds a client waits for its server.",
         _seconds],
        ["timeout-server", None, DEFAULT_TIMEOUT,
         "Seconds a server waits for its client (plain mode).", _seconds],
        ["handshake-timeout", None, DEFAULT_HANDSHAKE_TIMEOUT,
         "Seconds a new connection has to send its handshake.", _seconds],
        ["relay-buffer", None, RELAY_CHUNK,
         "Bytes per read and outgoing buffer limit per connection.", _buffer_size],
    ]

    def __init__(self):
        """Start with no C{--listen} endpoint."""
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description):
        """Listen on a Twisted endpoint string, e.g. tcp:9090:interface=127.0.0.1 (repeatable)."""
        self["listen"].append(description)

    def postOptions(self):
        """Check the port range, the endpoint strings and the tracker address."""
        if self["port-end"] <= self["port"]:
            raise usage.UsageError("--port-end must be greater than --port")
        for description in self["listen"]:
            try:
                endpoints.serverFromString(None, description)
            except Exception as e:
                raise usage.UsageError(f"bad --listen {description!r}: {e}")
        if self["tracker"] is not None:
            try:
                self["tracker-address"] = parse_tracker_address(self["tracker"])
            except ValueError as e:
                raise usage.UsageError(str(e))
            kinds = {d.split(":", 1)[0].strip().lower() for d in self["listen"]}
            if self["listen"] and not kinds & {"tcp", "tcp6", "ssl"}:
                raise usage.UsageError("--tracker needs a TCP listener: the tracker hands "
                                       "out the proxy's port")
        else:
            self["tracker-address"] = None


def _tcp_server_endpoint(reactor, host, port, backlog=1024):
    """@return: a TCP server endpoint on C{host} (IPv4 or IPv6) with a large backlog."""
    family = endpoints.TCP4ServerEndpoint
    try:
        if ipaddress.ip_address(host).version == 6:
            family = endpoints.TCP6ServerEndpoint
    except ValueError:
        pass
    return family(reactor, port, backlog=backlog, interface=host)


class ListenerService(service.Service):
    """
    Listens on the first endpoint of a list that can be bound, or on each.

    Binding happens in C{privilegedStartService} and a failure raises, so
    ``twistd`` stops with an error instead of running without a port.

    @ivar ports: the listening ports once started.
    """

    def __init__(self, candidates, factory, name, first_only):
        """
        @param candidates: L{IStreamServerEndpoint}s, tried in order.
        @param factory: the protocol factory.
        @param name: what is listening, for the log line.
        @param first_only: listen on the first endpoint that binds (a port
            range) rather than on all of them.
        """
        self._candidates = candidates
        self._factory = factory
        self._label = name
        self._first_only = first_only
        self.ports = []

    def privilegedStartService(self):
        """Bind now; raise L{CannotListenError} when nothing could be bound."""
        service.Service.privilegedStartService(self)
        errors = []
        for endpoint in self._candidates:
            outcome = []
            endpoint.listen(self._factory).addBoth(outcome.append)
            if not outcome:
                raise RuntimeError(f"{endpoint!r} did not listen synchronously")
            result = outcome[0]
            if hasattr(result, "getHost"):
                self.ports.append(result)
                address = result.getHost()
                log.info("{label} listening on {host}:{port}", label=self._label,
                         host=getattr(address, "host", address),
                         port=getattr(address, "port", ""))
                if self._first_only:
                    return
            else:
                errors.append(result.value)
                if not self._first_only:
                    raise result.value
        if not self.ports:
            raise CannotListenError(None, None, errors[-1] if errors else "no endpoint")

    def stopService(self):
        """Stop listening."""
        service.Service.stopService(self)
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

    def port_number(self):
        """@return: the first listening TCP port number (for the tracker)."""
        for port in self.ports:
            number = getattr(port.getHost(), "port", None)
            if number is not None:
                return number
        raise RuntimeError("not listening on a TCP port")


def makeService(options, reactor=None):
    """
    Build the proxy service.

    @param options: parsed L{Options}.
    @param reactor: the reactor to use; the global one when L{None}.
    @return: a L{service.MultiService} whose children are the allocator
        tuning (L{tvm_rpc.proxy.tuning}), the RPC listener,
        the websocket listener (when C{--web-port} is not 0) and the tracker
        registration (with C{--tracker}). It carries C{pool} and C{listener}
        attributes.
    """
    if reactor is None:
        from twisted.internet import reactor
    tracker = options["tracker-address"]
    pool = PairingPool(
        reactor,
        timeout_client=options["timeout-client"],
        timeout_server=options["timeout-server"],
        tracker_mode=tracker is not None,
    )
    tuning = AllocatorTuning(options["relay-buffer"], reactor)
    factory = ProxyFactory(pool, reactor, options["handshake-timeout"], options["relay-buffer"],
                           tuning.pair_ended)
    top = service.MultiService()
    tuning.setName("allocator")
    tuning.setServiceParent(top)
    if options["listen"]:
        candidates = [endpoints.serverFromString(reactor, d) for d in options["listen"]]
        listener = ListenerService(candidates, factory, "rpc-proxy", first_only=False)
    else:
        candidates = [_tcp_server_endpoint(reactor, options["host"], port)
                      for port in range(options["port"], options["port-end"])]
        listener = ListenerService(candidates, factory, "rpc-proxy", first_only=True)
    listener.setName("rpc")
    listener.setServiceParent(top)
    if options["web-port"]:
        from .web import ProxyWebSocketFactory

        web_factory = ProxyWebSocketFactory(pool, reactor, options["handshake-timeout"],
                                            tuning.pair_ended)
        web = ListenerService(
            [_tcp_server_endpoint(reactor, options["host"], options["web-port"])],
            web_factory, "rpc-proxy websocket /ws", first_only=True)
        web.setName("web")
        web.setServiceParent(top)
    if tracker is not None:
        from ..client.tracker import tracker_endpoint
        from .registration import ProxyRegistration

        host, port = tracker
        registration = ProxyRegistration(
            tracker_endpoint(reactor, host, port), pool, reactor, listener.port_number,
            tracker=f"{host}:{port}")
        pool.observer = registration
        registration.setName("tracker")
        registration.setServiceParent(top)
    top.pool = pool
    top.listener = listener
    return top

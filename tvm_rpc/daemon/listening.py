"""Binding a daemon's listening ports and announcing them.

L{ListenerService} binds the first free port of C{[port, port-end)} or every
C{--listen} endpoint; a failed bind is fatal; once bound it logs
C{<name> listening on <host>:<port>}. L{listener_service} builds one from a
daemon's options, over ports guarded against running out of descriptors
(L{tvm_rpc.daemon.ports}).
"""

import errno
import ipaddress

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure

from .logs import unfiltered_logger
from .ports import GuardedListenReactor

#: The listen backlog of every daemon (TVM listens with a backlog of 1).
DEFAULT_BACKLOG = 1024
#: Endpoint types that take a C{backlog} argument we fill in when absent.
BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix")


announce = unfiltered_logger("tvm_rpc.daemon")


def endpoint_kind(description):
    """@return: the type of a Twisted endpoint string (C{"tcp"}, C{"unix"}, ...), lower case."""
    return description.split(":", 1)[0].strip().lower()


def with_backlog(description, backlog=DEFAULT_BACKLOG):
    """@return: an endpoint string with C{backlog=} added where it applies and is absent."""
    if endpoint_kind(description) in BACKLOG_TYPES and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


def describe_address(address):
    """@return: C{(host, port)} of a listening address; C{("unix", path)} for UNIX."""
    host = getattr(address, "host", None)
    if host is not None:
        return host, getattr(address, "port", "")
    name = getattr(address, "name", b"")
    return "unix", (name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name))


def tcp_server_endpoint(reactor, host, port, backlog=DEFAULT_BACKLOG):
    """@return: a TCP server endpoint on C{host} (IPv4 or IPv6)."""
    family = endpoints.TCP4ServerEndpoint
    try:
        if ipaddress.ip_address(host).version == 6:
            family = endpoints.TCP6ServerEndpoint
    except ValueError:
        pass
    return family(reactor, port, backlog=backlog, interface=host)


def range_endpoints(reactor, host, port, port_end, backlog=DEFAULT_BACKLOG):
    """@return: one TCP server endpoint per port of [port, port_end) on C{host}."""
    return [tcp_server_endpoint(reactor, host, p, backlog) for p in range(port, port_end)]


def in_use(error):
    """@return: whether a L{CannotListenError} says the address is in use."""
    cause = getattr(error, "socketError", None)
    return getattr(cause, "errno", None) == errno.EADDRINUSE


class ListenerService(service.Service):
    """
    Listen on the first endpoint of a list that binds, or on every one.

    Binding happens at C{privilegedStartService} (before twistd drops
    privileges), or at C{startService} if that did not run. With
    C{first_only}, a candidate whose address is in use is skipped; any other
    failure is fatal, and so is running out of candidates. Without it, every
    endpoint must bind. Fatal means L{CannotListenError} is raised, so twistd
    exits non-zero rather than running without a port. Each bound port is
    announced as C{"<name> listening on <host>:<port>"} (C{unix:<path>} for a
    UNIX socket), a line C{--silent} does not quiet.

    @ivar candidates: the endpoints, in order.
    @ivar factory: the protocol factory.
    @ivar ports: the listening ports once bound.
    """

    def __init__(self, candidates, factory, name, first_only=True):
        """
        @param candidates: L{IStreamServerEndpoint}s; each must bind
            synchronously (TCP, SSL and UNIX endpoints do).
        @param factory: the protocol factory.
        @param name: what is listening, for the log line (C{"rpc-tracker"}).
        @param first_only: listen on the first endpoint that binds (a port
            range) rather than on all of them.
        """
        self.candidates = list(candidates)
        self.factory = factory
        self.label = name
        self.first_only = first_only
        self.ports = []

    @property
    def port(self):
        """The first listening port, or L{None} when not listening."""
        return self.ports[0] if self.ports else None

    def privilegedStartService(self):
        """Bind now; a failure is fatal."""
        super().privilegedStartService()
        self.bind()

    def startService(self):
        """Bind now unless L{privilegedStartService} already did."""
        super().startService()
        self.bind()

    def bind(self):
        """
        Bind, unless bound already.

        @raise CannotListenError: when a port cannot be bound (see the class).
        """
        if self.ports:
            return
        if not self.candidates:
            raise CannotListenError(None, None, f"{self.label}: nothing to listen on")
        if not self.first_only:
            for endpoint in self.candidates:
                self._announce(self._listen(endpoint))
            return
        first = last = None
        for endpoint in self.candidates:
            try:
                port = self._listen(endpoint)
            except CannotListenError as error:
                if not in_use(error):
                    raise
                first = first or error
                last = error
                continue
            self._announce(port)
            return
        raise CannotListenError(
            first.interface,
            f"{first.port}..{last.port}",
            # Named: a proxy has two ranges (--port and --web-port) and twistd prints only this.
            f"{self.label}: no free port among {len(self.candidates)} candidates (last: {last})",
        )

    def _listen(self, endpoint):
        """
        @return: the port C{endpoint} listens on.
        @raise CannotListenError: when it fails or does not bind at once.
        """
        outcome = []
        endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise CannotListenError(None, None, f"{endpoint!r} did not bind at once")
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def _announce(self, port):
        """Keep C{port} and log where it listens."""
        self.ports.append(port)
        host, number = describe_address(port.getHost())
        announce.info("{name} listening on {host}:{port}", name=self.label, host=host,
                      port=number)

    def port_number(self):
        """@return: the first listening TCP port number, or L{None} when there is none."""
        for port in self.ports:
            number = getattr(port.getHost(), "port", None)
            if number is not None:
                return number
        return None

    def stopService(self):
        """Stop listening. @return: a Deferred that fires once every port closed."""
        super().stopService()
        ports, self.ports = self.ports, []
        return defer.gatherResults([
            defer.maybeDeferred(p.stopListening).addCallback(self._closed, describe_address(p.getHost()))
            for p in ports
        ])

    def _closed(self, result, address):
        """Say a port closed (Twisted's own line is left out of the default log)."""
        announce.info("{name} stopped listening on {host}:{port}", name=self.label,
                      host=address[0], port=address[1])
        return result


def listener_service(reactor, factory, name, *, host, port, port_end, listen=(),
                     backlog=DEFAULT_BACKLOG):
    """
    Build the listener of a daemon from its listening options.

    @param reactor: the reactor; its listening ports are guarded against
        running out of descriptors (L{GuardedListenReactor}).
    @param factory: the protocol factory.
    @param name: the daemon's name for the log line (C{"rpc-server"}).
    @param host: the interface of the port range.
    @param port: the first port of the range.
    @param port_end: the end of the range (exclusive).
    @param listen: endpoint strings; when given they replace the range and
        every one must bind. C{backlog=} is added where absent.
    @param backlog: the listen backlog.
    @return: a L{ListenerService}.
    """
    guarded = GuardedListenReactor(reactor)
    if listen:
        candidates = [endpoints.serverFromString(guarded, with_backlog(d, backlog))
                      for d in listen]
        return ListenerService(candidates, factory, name, first_only=False)
    return ListenerService(range_endpoints(guarded, host, port, port_end, backlog), factory, name)

"""Plumbing shared by the three daemons: the tracker, the server and the proxy.

This is a top-level module of the ``tvm_rpc`` package that
``tvm_rpc.tracker``, ``tvm_rpc.server`` and ``tvm_rpc.proxy`` all import, so
that none of them imports another daemon's package (DESIGN.md's layering).
It is not sans-IO (that is ``tvm_rpc.protocol``'s job): it holds what every
``twistd`` daemon needs around its protocol.

- Option coercers (L{port_number}, L{positive_int}, L{positive_float}) and
  the ``HOST:PORT`` parser L{parse_address}.
- L{ListenOptions}: the ``--host/--port/--port-end/--listen`` flags (TVM's
  plus Twisted endpoint strings) and their validation.
- The ``--silent`` switch: L{logger} gives loggers that L{set_silent} quiets
  to warnings and worse; L{unfiltered_logger} for the few lines scripts wait
  for.
- Listening sockets that survive running out of file descriptors
  (L{GuardedTCPPort}, L{GuardedListenReactor}).
- L{ListenerService}: bind the first free port of ``[port, port-end)`` or
  every ``--listen`` endpoint; a failed bind is fatal; once bound it logs
  ``<name> listening on <host>:<port>``. L{listener_service} builds one from
  the options.

Why the guard: Twisted's own port logs C{EMFILE} and then either spins (the
listening socket stays readable, so the reactor calls it again at once) or,
with its reserved descriptor, accepts and closes one connection per reactor
turn for as long as descriptors stay exhausted. L{GuardedTCPPort} sheds the
whole backlog with a reserved descriptor (their clients see a prompt close
rather than a hang), stops reading for a short backoff, logs once per episode
and resumes by itself.
"""

import errno
import ipaddress
import os
import socket

from twisted.application import service
from twisted.internet import defer, endpoints, tcp
from twisted.internet.error import CannotListenError
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)
from twisted.python import usage
from twisted.python.failure import Failure

try:
    from twisted.internet import unix
except ImportError:  # pragma: no cover - platforms without AF_UNIX
    unix = None

#: The listen backlog of every daemon (TVM listens with a backlog of 1).
DEFAULT_BACKLOG = 1024
#: Endpoint types that take a C{backlog} argument we fill in when absent.
BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix")


# Option coercers and parsers


def port_number(value):
    """@return: C{value} as a port number. @raise ValueError: if it is not one."""
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"{value} is not a port number")
    return number


def positive_int(value):
    """@return: C{value} as a positive int. @raise ValueError: if it is not one."""
    number = int(value)
    if number <= 0:
        raise ValueError(f"{value} is not a positive integer")
    return number


def positive_float(value):
    """
    @return: C{value} as a positive, finite float (seconds, mostly).
    @raise ValueError: if it is not one.
    """
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{value} is not a positive number")
    return number


def parse_address(text, what="address"):
    """
    Parse ``HOST:PORT``; an IPv6 literal is given as ``[v6]:PORT`` (or bare
    before the last colon).

    @param text: the address.
    @param what: what it is (such as ``--tracker``), for the error message.
    @return: C{(host, port)}.
    @raise ValueError: when C{text} is not of that form.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host:
        raise ValueError(f"{what} must be HOST:PORT, not {text!r}")
    try:
        return host, port_number(port)
    except ValueError:
        raise ValueError(f"{what} must be HOST:PORT, not {text!r}") from None


def endpoint_kind(description):
    """@return: the type of a Twisted endpoint string (C{"tcp"}, C{"unix"}, ...), lower case."""
    return description.split(":", 1)[0].strip().lower()


def with_backlog(description, backlog=DEFAULT_BACKLOG):
    """@return: an endpoint string with C{backlog=} added where it applies and is absent."""
    if endpoint_kind(description) in BACKLOG_TYPES and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


def listen_parameters(host, port, port_end=9199, host_help="Address to listen on."):
    """
    The C{optParameters} rows of TVM's listening flags, with a daemon's defaults.

    @param host: the default of ``--host``.
    @param port: the default of ``--port``.
    @param port_end: the default of ``--port-end`` (exclusive).
    @param host_help: the help text of ``--host``.
    @return: rows for L{usage.Options.optParameters}.
    """
    return [
        ["host", None, host, host_help],
        ["port", None, port, "First port to try.", port_number],
        ["port-end", None, port_end, "End of the port range (exclusive).", port_number],
    ]


class ListenOptions:
    """
    Mixin for a daemon's L{usage.Options} (put it first among the bases):
    the repeatable ``--listen ENDPOINT`` and the checks of the listening flags.
    The ``--host/--port/--port-end`` rows come from L{listen_parameters}.
    """

    def __init__(self):
        """Start with no C{--listen} endpoint."""
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description):
        """Listen on a Twisted endpoint string, e.g. tcp:9090:interface=127.0.0.1
        (repeatable; replaces --host/--port/--port-end)."""
        self["listen"].append(description)

    def check_listen(self, port_range=True):
        """
        Check the port range and every ``--listen`` endpoint string.

        @param port_range: whether ``--port/--port-end`` must be a range
            (not when the daemon connects out instead of listening).
        @raise usage.UsageError: on an empty port range or a bad endpoint.
        """
        if port_range and self["port-end"] <= self["port"]:
            raise usage.UsageError("--port-end must be greater than --port")
        for description in self["listen"]:
            try:
                endpoints.serverFromString(None, description)
            except Exception as e:
                raise usage.UsageError(f"bad --listen {description!r}: {e}")


# The --silent switch

_level = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_level])


def logger(namespace):
    """
    @param namespace: the logger's namespace.
    @return: a L{Logger} whose events pass the daemons' level filter
        (L{set_silent}).
    """
    return Logger(namespace, observer=_observer)


def unfiltered_logger(namespace):
    """
    @param namespace: the logger's namespace.
    @return: a L{Logger} that C{--silent} does not quiet, for the few lines
        scripts wait for (such as the listening address).
    """
    return Logger(namespace)


def set_silent(silent):
    """
    Let only warnings and worse through (C{--silent}), or everything from info
    up, for the loggers made by L{logger}.

    @param silent: whether to be silent.
    """
    _level.setLogLevelForNamespace("", LogLevel.warn if silent else LogLevel.info)


log = logger("tvm_rpc.daemon")
announce = unfiltered_logger("tvm_rpc.daemon")


# Listening ports that survive running out of file descriptors

#: accept(2) errors that mean "out of descriptors or kernel memory".
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept(2) errors that concern one aborted connection only.
TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPERM, errno.EPROTO, errno.EINTR})


class _GuardedAccept:
    """
    Mixin for L{tcp.Port} subclasses: the accept loop with exhaustion handling.

    @ivar backoff: seconds the port stops accepting after running out of
        descriptors.
    @ivar max_accepts: the most connections accepted per reactor turn.
    """

    backoff = 0.25
    max_accepts = 128
    _reserve = None
    _resume_call = None
    _refused = 0
    _exhausted_since = None

    def startListening(self):
        """Listen, then reserve the descriptor used to shed the backlog."""
        super().startListening()
        self._take_reserve()

    def _take_reserve(self):
        """Hold one descriptor (on /dev/null) for L{_shed_backlog}, if one is free."""
        if self._reserve is None:
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._reserve = None

    def _release_reserve(self):
        """Give the reserved descriptor back."""
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    def doRead(self):
        """Accept the waiting connections, up to L{max_accepts} per reactor turn."""
        try:
            for _ in range(self.max_accepts):
                try:
                    skt, addr = self.socket.accept()
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                        return
                    if e.errno in TRANSIENT:
                        continue
                    if e.errno in EXHAUSTED:
                        self._exhausted(e.errno)
                        return
                    raise
                self._accepted(skt, addr)
        except Exception:
            log.failure("error accepting a connection on {port}", port=self._description())

    def _accepted(self, skt, addr):
        """Build the protocol and transport of an accepted socket."""
        if self._exhausted_since is not None:
            log.warn(
                "accepting connections on {port} again; refused {refused} while out of "
                "file descriptors",
                port=self._description(),
                refused=self._refused,
            )
            self._exhausted_since = None
            self._refused = 0
        if isinstance(addr, tuple) and len(addr) == 4:
            host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
            addr = (host[0],) + tuple(addr[1:])
        protocol = self.factory.buildProtocol(self._buildAddr(addr))
        if protocol is None:
            skt.close()
            return
        session = self.sessionno
        self.sessionno = session + 1
        transport = self.transport(skt, protocol, addr, self, session, self.reactor)
        protocol.makeConnection(transport)

    def _exhausted(self, code):
        """Out of descriptors: shed the backlog, pause, log once per episode."""
        if self._exhausted_since is None:
            self._exhausted_since = self.reactor.seconds()
            log.warn(
                "out of file descriptors on {port} ({error}): refusing new connections "
                "until some close",
                port=self._description(),
                error=errno.errorcode.get(code, code),
            )
        self._shed_backlog()
        self.stopReading()
        if self._resume_call is None or not self._resume_call.active():
            self._resume_call = self.reactor.callLater(self.backoff, self._resume)

    def _shed_backlog(self):
        """Close the connections waiting in the backlog, using the reserved fd."""
        if self._reserve is None:
            return
        self._release_reserve()
        try:
            for _ in range(self.max_accepts):
                try:
                    skt, _addr = self.socket.accept()
                except OSError:
                    break
                skt.close()
                self._refused += 1
        finally:
            self._take_reserve()

    def _resume(self):
        """Accept again after the backoff (unless the port closed meanwhile)."""
        self._resume_call = None
        if self.connected and not self.disconnecting:
            self.startReading()

    def _description(self):
        """@return: the listening address, for log lines."""
        try:
            return str(self.getHost())
        except Exception:
            return repr(self)

    def connectionLost(self, reason):
        """Stop the pending resume and free the reserve as the port closes."""
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self._resume_call = None
        self._release_reserve()
        super().connectionLost(reason)


class GuardedTCPPort(_GuardedAccept, tcp.Port):
    """A TCP listening port that does not spin when descriptors run out."""


if unix is not None:

    class GuardedUNIXPort(_GuardedAccept, unix.Port):
        """A UNIX listening port that does not spin when descriptors run out."""


class GuardedListenReactor:
    """
    A reactor proxy whose C{listenTCP}, C{listenSSL} and C{listenUNIX} build
    guarded ports; everything else goes to the real reactor. Pass it to
    L{twisted.internet.endpoints.serverFromString} so endpoint strings get
    guarded ports too. Reactors that are not file-descriptor based (such as
    L{twisted.internet.testing.MemoryReactor}) get the calls unchanged.
    """

    def __init__(self, reactor):
        """@param reactor: the reactor to wrap."""
        self._reactor = reactor
        self._guarded = isinstance(reactor, PosixReactorBase)

    def __getattr__(self, name):
        """Everything else is the wrapped reactor's."""
        return getattr(self._reactor, name)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        """Like L{IReactorTCP.listenTCP}, with a L{GuardedTCPPort}."""
        if not self._guarded:
            return self._reactor.listenTCP(port, factory, backlog, interface)
        p = GuardedTCPPort(port, factory, backlog, interface, self._reactor)
        p.startListening()
        return p

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        """Like L{IReactorSSL.listenSSL}: TLS over a L{GuardedTCPPort}."""
        if not self._guarded:
            return self._reactor.listenSSL(port, factory, contextFactory, backlog, interface)
        from twisted.protocols.tls import TLSMemoryBIOFactory

        p = self.listenTCP(
            port, TLSMemoryBIOFactory(contextFactory, False, factory), backlog, interface
        )
        p._type = "TLS"
        return p

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        """Like L{IReactorUNIX.listenUNIX}, with a guarded UNIX port."""
        if not self._guarded:
            return self._reactor.listenUNIX(address, factory, backlog, mode, wantPID)
        if unix is None:
            raise CannotListenError(address, None, "UNIX sockets are not supported")
        p = GuardedUNIXPort(address, factory, backlog, mode, self._reactor, wantPID)
        p.startListening()
        return p


# Binding: the first free port of a range, or every endpoint


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
        last = None
        for endpoint in self.candidates:
            try:
                port = self._listen(endpoint)
            except CannotListenError as error:
                if not in_use(error):
                    raise
                last = error
                continue
            self._announce(port)
            return
        first, final = self.candidates[0], self.candidates[-1]
        raise CannotListenError(
            getattr(first, "_interface", None),
            f"{getattr(first, '_port', '?')}..{getattr(final, '_port', '?')}",
            f"no free port among {len(self.candidates)} candidates (last: {last})",
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
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])


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

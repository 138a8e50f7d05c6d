"""``twistd rpc-tracker``: command-line options and the service they build."""

import ipaddress
import secrets

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.error import ReactorNotRunning
from twisted.python import usage

from .listen import GuardedListenReactor, ListenerService
from .logs import logger, set_silent
from .protocol import KeepAlive, TrackerFactory
from .state import TrackerState

log = logger("tvm_rpc.tracker")

#: Endpoint types that take a C{backlog} argument we fill in when absent.
_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix")


def _port_number(value):
    """@return: C{value} as a port number. @raise ValueError: if it is not one."""
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"{value} is not a port number")
    return number


def _positive(value):
    """@return: C{value} as a positive int. @raise ValueError: if it is not one."""
    number = int(value)
    if number <= 0:
        raise ValueError(f"{value} is not a positive integer")
    return number


class Options(usage.Options):
    """
    The options of ``twistd rpc-tracker``, TVM's flags plus ours.

    ``--listen`` (repeatable) replaces ``--host/--port/--port-end``.
    """

    synopsis = "[options]"
    longdesc = (
        "Run a TVM RPC tracker: servers register by key, clients request a server "
        "by key and get one when it is free (higher priority first, FIFO among equals)."
    )
    optFlags = [
        ["silent", None, "Log only warnings and errors."],
    ]
    optParameters = [
        ["host", None, "0.0.0.0", "Address to listen on."],
        ["port", None, 9190, "First port to try.", _port_number],
        ["port-end", None, 9199, "End of the port range (exclusive).", _port_number],
        ["stop-key", None, None, "Key that a STOP command must carry (default: random)."],
        ["keepalive-idle", None, 30, "Seconds of silence before TCP keepalive probes.", _positive],
        ["keepalive-interval", None, 10, "Seconds between TCP keepalive probes.", _positive],
        ["keepalive-count", None, 3, "Unanswered probes before a peer is dropped.", _positive],
        ["backlog", None, 1024, "Listen backlog.", _positive],
    ]

    def __init__(self):
        """Start with no C{--listen} endpoints."""
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description):
        """Listen on a Twisted endpoint string, e.g. tcp:9190:interface=127.0.0.1 (repeatable)."""
        self["listen"].append(description)

    def postOptions(self):
        """Check the port range and endpoints; pick a random stop key if none.

        @raise usage.UsageError: on an empty port range or a bad endpoint.
        """
        if self["port-end"] <= self["port"]:
            raise usage.UsageError("--port-end must be greater than --port")
        self["listen"] = [_with_backlog(d, self["backlog"]) for d in self["listen"]]
        for description in self["listen"]:
            try:
                endpoints.serverFromString(None, description)
            except Exception as e:
                raise usage.UsageError(f"bad --listen {description!r}: {e}")
        if self["stop-key"] is None:
            self["stop-key"] = "tracker:" + secrets.token_hex(16)


def _with_backlog(description, backlog):
    """@return: an endpoint string with C{backlog=} added where it applies and is absent."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind in _BACKLOG_TYPES and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


def _range_endpoints(reactor, host, port, port_end, backlog):
    """@return: one TCP endpoint per port of [port, port_end) on C{host}."""
    family = endpoints.TCP4ServerEndpoint
    try:
        if ipaddress.ip_address(host).version == 6:
            family = endpoints.TCP6ServerEndpoint
    except ValueError:
        pass
    return [family(reactor, p, backlog=backlog, interface=host) for p in range(port, port_end)]


def makeService(options, reactor=None):
    """
    Build the tracker service.

    @param options: parsed L{Options}.
    @param reactor: the reactor to use; the global one when L{None}.
    @return: a L{service.MultiService} with one L{ListenerService} child per
        listening address, all sharing one L{TrackerState}.
    """
    if reactor is None:
        from twisted.internet import reactor
    set_silent(options["silent"])
    listen_reactor = GuardedListenReactor(reactor)
    state = TrackerState(reactor)

    def on_stop():
        """A correct STOP was answered: stop the reactor (and so the service)."""
        log.info("stopping on request")
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    factory = TrackerFactory(
        state,
        options["stop-key"],
        on_stop,
        KeepAlive(
            options["keepalive-idle"],
            options["keepalive-interval"],
            options["keepalive-count"],
        ),
    )
    top = service.MultiService()
    if options["listen"]:
        for index, description in enumerate(options["listen"]):
            endpoint = endpoints.serverFromString(listen_reactor, description)
            listener = ListenerService([endpoint], factory)
            listener.setName(f"listener-{index}")
            listener.setServiceParent(top)
    else:
        candidates = _range_endpoints(
            listen_reactor, options["host"], options["port"], options["port-end"],
            options["backlog"],
        )
        listener = ListenerService(candidates, factory)
        listener.setName("listener-0")
        listener.setServiceParent(top)
    top.state = state
    top.factory = factory
    return top

"""``twistd rpc-tracker``: command-line options and the service they build."""

import secrets

from twisted.application import service
from twisted.internet.error import ReactorNotRunning
from twisted.python import usage

from ..daemon import (
    DEFAULT_BACKLOG,
    ListenOptions,
    listen_parameters,
    listener_service,
    positive_int,
    with_backlog,
)
from .logs import logger, set_silent
from .protocol import KeepAlive, TrackerFactory
from .state import TrackerState

log = logger("tvm_rpc.tracker")


class Options(ListenOptions, usage.Options):
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
    optParameters = listen_parameters("0.0.0.0", 9190) + [
        ["stop-key", None, None, "Key that a STOP command must carry (default: random)."],
        ["keepalive-idle", None, 30, "Seconds of silence before TCP keepalive probes.", positive_int],
        ["keepalive-interval", None, 10, "Seconds between TCP keepalive probes.", positive_int],
        ["keepalive-count", None, 3, "Unanswered probes before a peer is dropped.", positive_int],
        ["backlog", None, DEFAULT_BACKLOG, "Listen backlog.", positive_int],
    ]

    def postOptions(self):
        """Check the port range and endpoints; pick a random stop key if none.

        @raise usage.UsageError: on an empty port range or a bad endpoint.
        """
        self["listen"] = [with_backlog(d, self["backlog"]) for d in self["listen"]]
        self.check_listen()
        if self["stop-key"] is None:
            self["stop-key"] = "tracker:" + secrets.token_hex(16)


def makeService(options, reactor=None):
    """
    Build the tracker service.

    @param options: parsed L{Options}.
    @param reactor: the reactor to use; the global one when L{None}.
    @return: a L{service.MultiService} whose child C{"listener"} (a
        L{tvm_rpc.daemon.ListenerService}) listens on the first free port of
        the range or on every C{--listen} endpoint; it carries C{state} (the
        L{TrackerState}) and C{factory} attributes.
    """
    if reactor is None:
        from twisted.internet import reactor
    set_silent(options["silent"])
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
    listener = listener_service(
        reactor, factory, "rpc-tracker", host=options["host"], port=options["port"],
        port_end=options["port-end"], listen=options["listen"], backlog=options["backlog"],
    )
    listener.setName("listener")
    top = service.MultiService()
    listener.setServiceParent(top)
    top.state = state
    top.factory = factory
    return top

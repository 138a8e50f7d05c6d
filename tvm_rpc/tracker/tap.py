"""C{twistd rpc-tracker}: command-line options and the service they build."""

import secrets

from twisted.application import service
from twisted.internet.error import ReactorNotRunning
from twisted.python import usage

from ..daemon.listening import DEFAULT_BACKLOG, listener_service, with_backlog
from ..daemon.logfile import LogFileOptions, under_twistd
from ..daemon.logs import logger, set_silent
from ..daemon.options import (
    ListenOptions,
    check_endpoints,
    listen_parameters,
    positive_float,
    positive_int,
)
from ..transport import KeepAlive
from .limits import TrackerLimits
from .protocol import TrackerFactory
from .state import TrackerState

log = logger("tvm_rpc.tracker")

DEFAULTS = TrackerLimits()

#: The smallest --max-output: below one transport buffer the bound would
#: close peers that read normally but ask for a large SUMMARY.
MIN_MAX_OUTPUT = 64 * 1024


def seconds_or_off(value):
    """
    @return: C{value} as positive seconds, or L{None} for C{off} (or C{0}).
    @raise ValueError: for anything else.
    """
    if str(value).strip().lower() in ("off", "none", "0", "0.0"):
        return None
    return positive_float(value)


def _shown(seconds):
    """@return: a default number of seconds (or L{None}) as --help shows it."""
    return "off" if seconds is None else f"{seconds:g}"


class Options(ListenOptions, LogFileOptions, usage.Options):
    """
    The options of C{twistd rpc-tracker}, TVM's flags plus ours.

    C{--listen} (repeatable) replaces C{--host/--port/--port-end};
    C{--http} (repeatable, off by default) serves the status page, its JSON
    and the metrics.
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
        ["max-output", None, DEFAULTS.max_output,
         "Bytes of replies a peer may leave unread beyond its socket buffers (the tracker "
         "stops reading it meanwhile); past that the connection is closed.", positive_int],
        ["max-connections-per-address", None, DEFAULTS.max_connections_per_address,
         "Open connections allowed from one IP address; more are closed at once.",
         positive_int],
        ["idle-timeout", None, _shown(DEFAULTS.idle_timeout),
         "Seconds a connection that holds nothing (no waiting request, no server) may "
         "stay silent after the magic, or 'off'. Off by default: TVM's client keeps an "
         "idle connection and its summary() does not reconnect.", seconds_or_off],
        ["max-pending-per-connection", None, DEFAULTS.max_pending,
         "Waiting requests allowed on one connection (TVM's and our clients keep one); "
         "one more closes the connection.", positive_int],
        ["max-priority", None, f"{DEFAULTS.max_priority:g}",
         "Highest request priority: a request asking for more is queued at this one.",
         positive_float],
        ["max-keys", None, DEFAULTS.max_keys,
         "Device keys listed at once; a new key evicts the longest-unused one, and is "
         "refused (its connection closed) when all are in use.", positive_int],
        ["key-idle-timeout", None, _shown(DEFAULTS.key_idle_timeout),
         "Seconds a key with no server, no waiting request and no server handed out "
         "stays listed in SUMMARY, or 'off' (TVM keeps keys for ever).", seconds_or_off],
        ["activity-lines-per-second", None, DEFAULTS.activity_lines_per_second,
         "Grant, release and other activity lines logged per second at most; the rest "
         "are counted in one line per second.", positive_int],
    ]

    def __init__(self):
        """Start with no C{--http} endpoint."""
        super().__init__()
        self["http"] = []

    def opt_http(self, description):
        """Serve the status page (/), its JSON (/api/summary) and Prometheus metrics
        (/metrics) on a Twisted endpoint string, e.g. tcp:9180:interface=127.0.0.1
        (repeatable; off by default)."""
        self["http"].append(description)

    def postOptions(self):
        """Check the port range, endpoints and limits; pick a random stop key if none.

        @raise usage.UsageError: on an empty port range, a bad endpoint or a
            limit out of range.
        """
        self["listen"] = [with_backlog(d, self["backlog"]) for d in self["listen"]]
        self.check_listen()
        check_endpoints(self["http"], "--http")
        for name in ("idle-timeout", "key-idle-timeout", "max-priority"):
            if isinstance(self[name], str):
                # A default given as text (so --help shows it) still needs coercing.
                coerce = positive_float if name == "max-priority" else seconds_or_off
                self[name] = coerce(self[name])
        if self["max-output"] < MIN_MAX_OUTPUT:
            raise usage.UsageError(f"--max-output must be at least {MIN_MAX_OUTPUT} bytes")
        if self["stop-key"] is None:
            self["stop-key"] = "tracker:" + secrets.token_hex(16)

    def limits(self):
        """@return: the L{TrackerLimits} these options give."""
        return TrackerLimits(
            max_output=self["max-output"],
            max_connections_per_address=self["max-connections-per-address"],
            idle_timeout=self["idle-timeout"],
            max_pending=self["max-pending-per-connection"],
            max_priority=self["max-priority"],
            max_keys=self["max-keys"],
            key_idle_timeout=self["key-idle-timeout"],
            activity_lines_per_second=self["activity-lines-per-second"],
        )


def makeService(options, reactor=None):
    """
    Build the tracker service.

    @param options: parsed L{Options}.
    @param reactor: the reactor to use; the global one when L{None}.
    @return: a L{service.MultiService} whose child C{"listener"} (a
        L{tvm_rpc.daemon.listening.ListenerService}) listens on the first free port of
        the range or on every C{--listen} endpoint; it carries C{state} (the
        L{TrackerState}) and C{factory} attributes. With C{--http}, a child
        C{"http"} (another L{tvm_rpc.daemon.listening.ListenerService})
        serves L{tvm_rpc.tracker.web.tracker_web_root}.
    """
    if reactor is None:
        from twisted.internet import reactor
    set_silent(options["silent"], options["verbose"])
    state = TrackerState(reactor, options.limits())

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
    if options["http"]:
        # Imported here: twisted.web and prometheus_client load only when asked for.
        from ..daemon.http import http_listener
        from .web import tracker_web_root

        http = http_listener(reactor, tracker_web_root(state), "rpc-tracker http",
                             options["http"])
        http.setName("http")
        http.setServiceParent(top)
    top.state = state
    top.factory = factory
    return under_twistd(options, top)

"""``twistd rpc-server``: command-line options and the service they build."""

import os
import tempfile

from twisted.python import usage

from ..client.registration import TrackerRegistration
from ..client.tracker import tracker_endpoint
from .gate import SessionGate
from .listener import DEFAULT_HANDSHAKE_TIMEOUT, InProcessRunner, ListenerFactory
from .logs import set_silent
from .proxied import ProxiedServerService, ProxyLink
from .service import RPCServerService
from .worker import DEFAULT_SESSION_FACTORY, WorkerPool, load_callable, run_init


def _port_number(value):
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"{value} is not a port number")
    return number


def _positive_float(value):
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{value} is not a positive number")
    return number


def _positive_int(value):
    number = int(value)
    if number <= 0:
        raise ValueError(f"{value} is not a positive integer")
    return number


def parse_address(text, what):
    """
    @param text: ``HOST:PORT`` (IPv6 hosts in brackets or bare before the last colon).
    @return: C{(host, port)}.
    @raise usage.UsageError: when it is not an address.
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise usage.UsageError(f"{what} must be HOST:PORT, not {text!r}")
    try:
        return host, _port_number(port)
    except ValueError:
        raise usage.UsageError(f"{what} must be HOST:PORT, not {text!r}") from None


class Options(usage.Options):
    """
    The options of ``twistd rpc-server``: TVM's flags plus ours.

    ``--listen`` (repeatable) replaces ``--host/--port/--port-end``.
    """

    synopsis = "[options]"
    longdesc = (
        "Run a TVM RPC server: it registers with a tracker by key (or serves "
        "direct connections) and runs each session in its own worker process."
    )
    optFlags = [
        ["through-proxy", None, "Connect out to the proxy at --host/--port instead of listening."],
        ["silent", None, "Log only warnings and errors."],
        ["no-fork", None, "Run sessions in the server process (for tests and platforms without fork)."],
    ]
    optParameters = [
        ["host", None, "0.0.0.0", "Address to listen on."],
        ["port", None, 9090, "First port to try.", _port_number],
        ["port-end", None, 9199, "End of the port range (exclusive).", _port_number],
        ["tracker", None, None, "The tracker to register with, HOST:PORT."],
        ["key", None, "", "The device key clients ask for."],
        ["custom-addr", None, None, "The address to report to the tracker instead of the one it sees."],
        ["work-dir", None, None, "Directory for session work directories (default: a fresh temporary one)."],
        ["handshake-timeout", None, DEFAULT_HANDSHAKE_TIMEOUT,
         "Seconds a peer has to complete its handshake.", _positive_float],
        ["max-sessions", None, 1,
         "Sessions run at once (TVM runs one: measurements stay exclusive).", _positive_int],
        ["session-factory", None, DEFAULT_SESSION_FACTORY,
         "MODULE:CALLABLE making a session protocol from (work_root, clock=...)."],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []
        self["init"] = []

    def opt_listen(self, description):
        """Listen on a Twisted endpoint string, e.g. tcp:9090:interface=127.0.0.1 (repeatable)."""
        self["listen"].append(description)

    def opt_init(self, spec):
        """Import MODULE[:CALLABLE] at start-up (and in every worker) so it registers functions (repeatable)."""
        self["init"].append(spec)

    def postOptions(self):
        """Check the options together."""
        if self["through-proxy"] and (self["listen"] or self["tracker"]):
            raise usage.UsageError(
                "--through-proxy connects out to --host/--port; --listen and --tracker "
                "do not apply (the proxy registers its servers with its own tracker)"
            )
        if self["port-end"] <= self["port"] and not self["through-proxy"]:
            raise usage.UsageError("--port-end must be greater than --port")
        if self["tracker"] is not None:
            self["tracker"] = parse_address(self["tracker"], "--tracker")
            if not self["key"]:
                raise usage.UsageError("--tracker needs --key: the device type clients ask for")
        if ":" not in self["session-factory"]:
            raise usage.UsageError("--session-factory must be MODULE:CALLABLE")
        if any(c.isspace() for c in self["key"]):
            raise usage.UsageError("--key must not contain spaces")
        for spec in self["init"]:
            if not spec.partition(":")[0]:
                raise usage.UsageError(f"bad --init {spec!r}: want MODULE[:CALLABLE]")
        from twisted.internet import endpoints

        for description in self["listen"]:
            try:
                endpoints.serverFromString(None, description)
            except Exception as e:
                raise usage.UsageError(f"bad --listen {description!r}: {e}")


def makeService(options, reactor=None):
    """
    Build the server service.

    @param options: parsed L{Options}.
    @param reactor: the reactor to use; the global one when L{None}.
    @return: an L{RPCServerService}.
    @raise ImportError: when an ``--init`` module or the session factory
        cannot be imported.
    """
    if reactor is None:
        from twisted.internet import reactor
    set_silent(options["silent"])
    run_init(options["init"])
    session_module, make_session = load_callable(options["session-factory"])
    work_root = options["work-dir"]
    owns_work_root = work_root is None
    if work_root is None:
        work_root = tempfile.mkdtemp(prefix="tvm_rpc_server-")
    else:
        os.makedirs(work_root, exist_ok=True)
    work_root = os.path.abspath(work_root)
    tracker = options["tracker"]
    gate = SessionGate(
        options["key"], tracked=tracker is not None, max_sessions=options["max-sessions"]
    )
    if options["no-fork"]:
        runner = InProcessRunner(
            lambda: make_session(work_root, clock=reactor),
            reactor,
            timeout_notice=getattr(session_module, "timeout_notice", None),
        )
    else:
        runner = WorkerPool(
            reactor,
            work_root,
            init=tuple(options["init"]),
            session_factory=options["session-factory"],
            timeout_notice=getattr(session_module, "timeout_notice", None),
            silent=options["silent"],
        )
    if options["through-proxy"]:
        gate.max_sessions = 1
        host, port = options["host"], options["port"]
        link = ProxyLink(
            tracker_endpoint(reactor, host, port), gate, runner, reactor, proxy=f"proxy {host}:{port}"
        )
        cleanup = None
        if owns_work_root:
            import shutil

            def cleanup():
                shutil.rmtree(work_root, ignore_errors=True)

        return ProxiedServerService(link, runner, cleanup)
    factory = ListenerFactory(gate, runner, reactor, options["handshake-timeout"])
    make_registration = None
    if tracker is not None:
        host, port = tracker

        def make_registration(bound_port):
            return TrackerRegistration(
                tracker_endpoint(reactor, host, port),
                gate,
                bound_port,
                options["custom-addr"],
                reactor,
                tracker=f"tracker {host}:{port}",
            )

    return RPCServerService(
        reactor,
        factory,
        host=options["host"],
        port=options["port"],
        port_end=options["port-end"],
        listen=options["listen"],
        make_registration=make_registration,
        runner=runner,
        work_root=work_root,
        owns_work_root=owns_work_root,
    )

"""C{twistd rpc-server}: command-line options and the service they build."""

import os
import tempfile

from twisted.python import usage

from ..client.registration import LinkSettings, TrackerRegistration
from ..client.tracker import tracker_endpoint
from ..daemon.listening import listener_service
from ..daemon.logfile import LogFileOptions, under_twistd
from ..daemon.options import (
    ListenOptions,
    MetricsHttpOptions,
    listen_parameters,
    non_negative_float,
    parse_address,
    positive_float,
    positive_int,
)
from ..transport import PEER_HANDSHAKE_TIMEOUT
from .activity import ServerActivity
from .gate import SessionGate
from .limits import (
    DEFAULT_MAX_BOX_BYTES,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_WORK_DIR_BYTES,
    SessionSettings,
    parse_bytes,
)
from .listener import InProcessRunner, ListenerFactory
from .logs import set_silent
from .modules import (
    DEFAULT_SESSION_FACTORY,
    find_libraries,
    load_callable,
    load_libraries,
    run_init,
)
from .pool import KEEP_WORKER_SECONDS, WorkerPool
from .proxied import ProxiedServerService, ProxyLink
from .service import RPCServerService


class Options(ListenOptions, MetricsHttpOptions, LogFileOptions, usage.Options):
    """
    The options of C{twistd rpc-server}: TVM's flags plus ours.

    C{--listen} (repeatable) replaces C{--host/--port/--port-end}; C{--http}
    (repeatable, off by default) serves the server's metrics.
    """

    synopsis = "[options]"
    longdesc = (
        "Run a TVM RPC server: it registers with a tracker by key (or serves "
        "direct connections) and runs each session in its own worker process. "
        "tvm_rpc's clients get the tvm_rpc session protocol; Apache TVM's own "
        "clients (tvm.rpc, MetaSchedule) get TVM's session protocol when TVM's "
        "runtime is installed on the device, and a clear refusal naming what to "
        "install when it is not (or with --in-process)."
    )
    optFlags = [
        ["through-proxy", None, "Connect out to the proxy at --host/--port instead of listening."],
        ["silent", None, "Log only warnings and errors."],
        ["no-fork", None, "TVM's --no-fork: start each session's worker process as a fresh "
                          "interpreter (spawn) instead of forking a warm one, for GPU runtimes "
                          "(ROCm, Metal, OpenCL) that break across fork. Sessions still run in "
                          "their own process."],
        ["in-process", None, "Run sessions inside the server process (tests, platforms without "
                             "processes; serves tvm_rpc's clients only, and one hung call blocks "
                             "the server)."],
        ["send-tracebacks", None, "Send the server's traceback with each remote error (off: "
                                  "clients get the error's type and message only)."],
        ["no-code-upload", None, "Refuse to load modules uploaded in a session (.py, .so, .tar): "
                                 "only --init modules and registered functions run."],
    ]
    optParameters = listen_parameters("0.0.0.0", 9090) + [
        ["tracker", None, None, "The tracker to register with, HOST:PORT."],
        ["key", None, "", "The device key clients ask for."],
        ["custom-addr", None, None, "The address to report to the tracker instead of the one it sees."],
        ["load-library", None, None,
         "Shared libraries to load in every process that serves sessions, as TVM does "
         "(colon-separated, relative to the current directory; ctypes, RTLD_GLOBAL)."],
        ["work-dir", None, None, "Directory for session work directories (default: a fresh temporary one)."],
        ["handshake-timeout", None, PEER_HANDSHAKE_TIMEOUT,
         "Seconds a peer has to complete its handshake, and then to send its "
         "session's first message.", positive_float],
        ["max-session-time", None, None,
         "Seconds a session may run at most, whatever its client asked for "
         "(default: as long as the client asks; TVM's server has no cap).", positive_float],
        ["keep-worker", None, KEEP_WORKER_SECONDS,
         "Seconds a session's worker process waits for the next session of the same "
         "tvm_rpc client, when that client asks to keep it (it proves it with a token): "
         "a tuning loop's next candidate then skips a fork and a fresh process. Any other "
         "session retires it first. 0: a fresh worker for every session.",
         non_negative_float],
        ["max-sessions", None, 1,
         "Sessions run at once (TVM runs one: measurements stay exclusive).", positive_int],
        ["session-factory", None, DEFAULT_SESSION_FACTORY,
         "MODULE:CALLABLE making a session protocol from (work_root, clock=..., settings=...)."],
        ["max-box-bytes", None, DEFAULT_MAX_BOX_BYTES,
         "Largest message (AMP box) a session accepts; a client that sends a larger one "
         "is told so and disconnected (bytes, or with K/M/G).", parse_bytes],
        ["max-streams", None, DEFAULT_MAX_STREAMS,
         "Streams (uploads, downloads, array copies, long values) a session may hold "
         "open at once; opening one more fails.", positive_int],
        ["idle-timeout", None, None,
         "Seconds a tvm_rpc session may stay silent between calls before the server "
         "ends it (default: no limit; TVM's sessions are not covered).", positive_float],
        ["max-work-dir-bytes", None, DEFAULT_MAX_WORK_DIR_BYTES,
         "Bytes uploads may put in a session's work directory; an upload that would "
         "pass it fails (bytes, or with K/M/G).", parse_bytes],
    ]

    def __init__(self):
        """Start with no C{--listen} endpoint and no C{--init} module."""
        super().__init__()
        self["init"] = []

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
        self.check_listen(port_range=not self["through-proxy"])
        self.check_http()
        if self["tracker"] is not None:
            try:
                self["tracker"] = parse_address(self["tracker"], "--tracker")
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
            if not self["key"]:
                raise usage.UsageError("--tracker needs --key: the device type clients ask for")
        if self["in-process"] and self["no-fork"]:
            raise usage.UsageError(
                "--in-process runs sessions in the server; --no-fork starts a process "
                "per session without fork: choose one"
            )
        try:
            self["libraries"] = tuple(find_libraries(self["load-library"]))
        except ValueError as e:
            raise usage.UsageError(f"--load-library: {e}") from None
        if ":" not in self["session-factory"]:
            raise usage.UsageError("--session-factory must be MODULE:CALLABLE")
        if any(c.isspace() for c in self["key"]):
            raise usage.UsageError("--key must not contain spaces")
        for spec in self["init"]:
            if not spec.partition(":")[0]:
                raise usage.UsageError(f"bad --init {spec!r}: want MODULE[:CALLABLE]")
        try:
            self["session-settings"] = SessionSettings(
                max_box_bytes=self["max-box-bytes"],
                max_streams=self["max-streams"],
                max_work_dir_bytes=self["max-work-dir-bytes"],
                send_tracebacks=bool(self["send-tracebacks"]),
                code_upload=not self["no-code-upload"],
                idle_timeout=self["idle-timeout"],
            )
        except ValueError as e:
            option = str(e).split(" ", 1)[0].replace("_", "-")
            raise usage.UsageError(f"--{option}: {e}") from None


def makeService(options, reactor=None):
    """
    Build the server service.

    @param options: parsed L{Options}.
    @param reactor: the reactor to use; the global one when L{None}.
    @return: an L{RPCServerService}, or a L{ProxiedServerService} with
        C{--through-proxy}; with C{--http}, its child C{"http"} serves the
        metrics (L{tvm_rpc.server.metrics}).
    @raise ImportError: when an C{--init} module or the session factory
        cannot be imported.
    """
    if reactor is None:
        from twisted.internet import reactor
    set_silent(options["silent"], options["verbose"])
    if options["in-process"]:
        load_libraries(options["libraries"])
    run_init(options["init"])
    session_module, make_session = load_callable(options["session-factory"])
    settings = options["session-settings"]
    work_root = options["work-dir"]
    owns_work_root = work_root is None
    if work_root is None:
        work_root = tempfile.mkdtemp(prefix="tvm_rpc_server-")
    else:
        os.makedirs(work_root, exist_ok=True)
    work_root = os.path.abspath(work_root)
    tracker = options["tracker"]
    activity = ServerActivity()
    gate = SessionGate(
        options["key"], tracked=tracker is not None, max_sessions=options["max-sessions"]
    )
    if options["in-process"]:
        runner = InProcessRunner(
            lambda: make_session(work_root, clock=reactor, settings=settings),
            reactor,
            timeout_notice=getattr(session_module, "timeout_notice", None),
            max_session_time=options["max-session-time"],
            activity=activity,
        )
    else:
        runner = WorkerPool(
            reactor,
            work_root,
            init=tuple(options["init"]),
            session_factory=options["session-factory"],
            session_settings=settings,
            timeout_notice=getattr(session_module, "timeout_notice", None),
            silent=options["silent"],
            verbose=bool(options["verbose"]),
            libraries=options["libraries"],
            spawn=bool(options["no-fork"]),
            start_timeout=options["handshake-timeout"],
            max_session_time=options["max-session-time"],
            keep_worker=options["keep-worker"],
            activity=activity,
        )
    if options["through-proxy"]:
        gate.max_sessions = 1
        host, port = options["host"], options["port"]
        link = ProxyLink(
            tracker_endpoint(reactor, host, port), gate, runner, reactor, proxy=f"proxy {host}:{port}",
            activity=activity,
        )
        server = ProxiedServerService(link, runner, work_root, owns_work_root)
        _serve_metrics(options, reactor, server, activity)
        return under_twistd(options, server)
    factory = ListenerFactory(gate, runner, reactor, options["handshake-timeout"],
                              activity=activity)
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
                LinkSettings(tracker=f"tracker {host}:{port}"),
            )

    listener = listener_service(
        reactor, factory, "rpc-server", host=options["host"], port=options["port"],
        port_end=options["port-end"], listen=options["listen"],
    )
    server = RPCServerService(
        listener,
        factory,
        make_registration=make_registration,
        runner=runner,
        work_root=work_root,
        owns_work_root=owns_work_root,
    )
    _serve_metrics(options, reactor, server, activity,
                   registered=None if tracker is None else lambda: _registered(server))
    return under_twistd(options, server)


def _serve_metrics(options, reactor, server, activity, registered=None):
    """With C{--http}, add the metrics listener to C{server} (its child C{"http"})."""
    if not options["http"]:
        return
    # Imported here: twisted.web and prometheus_client load only when asked for.
    from ..daemon.http import serve_metrics
    from .metrics import server_registry

    spare_ready = getattr(server.runner, "spare_ready", None)
    serve_metrics(reactor, server, server_registry(activity, registered, spare_ready),
                  "rpc-server http", options["http"])


def _registered(server):
    """@return: whether C{server} is registered with its tracker (not yet, before it listens)."""
    registration = getattr(server, "registration", None)
    return registration is not None and registration.registered

"""The AMP responder protocol that serves one session.

L{SessionProtocol} answers the session commands of
L{tvm_rpc.protocol.session_commands} from a
L{SessionEnvironment<tvm_rpc.server.environment.SessionEnvironment>}.

For the server's plumbing (listener, handshake, worker process):

  - L{make_session_protocol} C{(work_root, registry=None, *, clock=None,
    settings=None)} returns a fresh protocol for one session. Its work
    directory is created under C{work_root} on C{connectionMade} and
    removed, with every handle and stream, on C{connectionLost}. C{settings}
    (a L{SessionSettings<tvm_rpc.server.limits.SessionSettings>}) carries the
    operator's limits: a box above C{max_box_bytes} ends the session with a
    L{SessionEnded<tvm_rpc.protocol.session_commands.SessionEnded>} notice (C{code="limit"})
    naming the limit; streams and work directory bytes are bounded by the
    environment; remote errors carry tracebacks only with C{send_tracebacks}.
  - The protocol can start in the middle of a byte stream: after the handshake,
    call C{makeConnection(transport)} and then C{dataReceived(rest)} with the
    bytes that arrived after the handshake; nothing is lost.
  - L{prepare} imports the array backend (TVM's runtime takes ~1-2 s to
    import): call it in a warm worker before the session arrives.
  - L{timeout_notice} C{(seconds)} gives the bytes to send to a client
    whose session was ended for outliving its C{-timeout=N}.
  - A worker that dies (crash, timeout kill) cannot remove its work directory:
    work directories are named C{session-<pid>-*}, and
    L{remove_work_dirs_of<tvm_rpc.server.workdir.remove_work_dirs_of>} C{(work_root, pid)}
    removes a dead worker's.
  - The protocol registers itself as a streaming producer on its transport:
    while answers wait to be sent (the transport's buffer is full) it stops
    reading and handling requests, so a client that asks for data without
    reading it cannot make the server buffer more than about one answer (one
    chunk) beyond the transport's own buffer.
  - A peer that is not speaking AMP (a real TVM RPC client sends a TVM packet
    whose first byte is not 0, while every AMP box starts with a 0 byte) is
    logged as a protocol mismatch and disconnected at once.

Responders run user functions synchronously (the worker process is per
session, so blocking is acceptable). Calls are served by
L{CallResponder<tvm_rpc.server.call_responder.CallResponder>}: a function
may also return a Deferred or be a coroutine function; its call is answered
when it completes, and other calls proceed meanwhile. Any exception becomes a
L{RemoteError<tvm_rpc.protocol.remote_error.RemoteError>} (type name and message; the
traceback only with C{send_tracebacks}) and the session stays usable.
"""

import os

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from .. import __version__
from ..lean_amp import LeanAMP
from ..protocol import ampwire, session_commands, values
from ..protocol.remote_error import RemoteErrorLocator
from .backends import select_backend
from .call_responder import CallResponder
from .environment import SessionEnvironment
from .limits import SessionSettings
from .modules import PythonModule

log = Logger()


def prepare(backend="auto"):
    """
    Import the array backend ahead of the session.

    @param backend: C{"auto"}, C{"tvm"}, C{"numpy"} or C{"python"}.
    @return: the backend's name.
    """
    return select_backend(backend).name


def timeout_notice(seconds):
    """
    @param seconds: the session timeout that ran out.
    @return: the bytes of a L{SessionEnded<tvm_rpc.protocol.session_commands.SessionEnded>}
        box telling the client its session timed out.
    """
    return session_commands.session_ended_box(
        "timeout", f"the session timed out after {seconds:g} s and was ended by the server"
    )


@implementer(IPushProducer)
class SessionProtocol(CallResponder, RemoteErrorLocator, LeanAMP):
    """
    Serve one session over AMP. It is also the push producer registered on
    its transport (AMP's parser pauses and resumes).

    @ivar environment: the L{SessionEnvironment}, from C{connectionMade} on.
    @ivar keeper: set by the worker process that runs the session: called
        with C{Goodbye}'s C{keep} before it is answered (the client closes
        once it has the answer, which the worker must not take for a client
        gone away), it returns the rest of the answer: the token and
        C{keep_for} when the worker stays for the client's next session,
        else nothing. L{None}: no worker to tell.
    @ivar kept: whether the worker stays for the client's next session.
    @ivar settings: the operator's L{SessionSettings}.
    @ivar send_tracebacks: whether remote errors carry tracebacks (read by
        L{RemoteErrorLocator<tvm_rpc.protocol.remote_error.RemoteErrorLocator>},
        which wraps every responder's errors once).
    """

    def __init__(self, work_root=None, registry=None, *, clock=None, backend="auto",
                 environment=None, settings=None):
        """
        @param work_root: where the session's work directory is created (the
            system's temporary directory when L{None}).
        @param registry: the global functions (the process-wide registry when
            L{None}).
        @param clock: an L{IReactorTime} (the global reactor when L{None}).
        @param backend: the array backend preference.
        @param environment: a ready L{SessionEnvironment} (tests); one is
            created on C{connectionMade} otherwise.
        @param settings: a L{SessionSettings}; the environment's when one is
            given, else the defaults, when L{None}.
        """
        super().__init__()
        if settings is None:
            settings = SessionSettings() if environment is None else environment.settings
        self.settings = settings
        self.send_tracebacks = settings.send_tracebacks
        self._parser.max_box_size = settings.max_box_bytes
        self._work_root = work_root
        self._registry = registry
        self._clock = clock
        self._backend = backend
        self.environment = environment
        self._first_bytes = True
        self._refused = False
        self._callees = {}
        self._idle = None
        self.peer = "?"
        self.keeper = None
        self.kept = False

    def _reactor(self):
        """@return: the injected clock, or the global reactor imported on first use."""
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        return self._clock

    def connectionMade(self):
        """Create the session's environment and work directory."""
        try:
            self.peer = str(self.transport.getPeer())
        except Exception:
            self.peer = "?"
        if self.environment is None:
            try:
                self.environment = SessionEnvironment.create(
                    self._work_root, self._registry, backend_name=self._backend,
                    settings=self.settings,
                )
            except OSError:
                log.failure("cannot create a work directory under {root} for {peer}; "
                            "closing", root=self._work_root, peer=self.peer)
                self._first_bytes = False
                self._refused = True
                self.transport.loseConnection()
                return
        log.debug("session from {peer} in {work_dir}", peer=self.peer,
                 work_dir=self.environment.work_dir.root)
        if self.settings.idle_timeout:
            self._idle = self._reactor().callLater(self.settings.idle_timeout, self._idled)
        try:
            # AMP's parser is a push producer: pausing it stops both reading
            # from the socket and handling requests already received.
            self.transport.registerProducer(self, True)
        except (AttributeError, RuntimeError):
            log.warn("cannot throttle {peer}: its transport has a producer already",
                     peer=self.peer)
        super().connectionMade()

    def dataReceived(self, data):
        """
        Refuse a peer that does not speak AMP, then parse boxes; a box that
        breaks the protocol is logged and ends the session.
        """
        if self._refused:
            return
        if self._first_bytes and data:
            self._first_bytes = False
            if data[0] != 0:
                log.warn(
                    "protocol mismatch: {peer} does not speak the tvm_rpc session protocol "
                    "(first bytes {head!r}; a TVM RPC client?); closing",
                    peer=self.peer, head=bytes(data[:16]),
                )
                self._refused = True
                self.transport.loseConnection()
                return
        try:
            super().dataReceived(data)
        except Exception:
            log.failure("protocol violation from {peer}; closing the session", peer=self.peer)
            self._refused = True
            self.transport.loseConnection()
        if self._idle is not None and self._idle.active():
            # Counted from here: calls run in this call, so a long call is not idleness.
            self._idle.reset(self.settings.idle_timeout)

    def _idled(self):
        """No message for the idle timeout: tell the client, end the session."""
        self._idle = None
        timeout = self.settings.idle_timeout
        log.warn("ending the session of {peer}: idle for {timeout:g} s (--idle-timeout)",
                 peer=self.peer, timeout=timeout)
        self._refused = True
        self.emit(session_commands.session_ended_box(
            "idle",
            f"the server ended the session: no call for {timeout:g} s (the server's --idle-timeout)",
        ))
        self._flush_cork()
        self.transport.loseConnection()

    def refuse_boxes(self, error):
        """Tell a peer whose box is over the limit why its session ends, then close."""
        if isinstance(error, ampwire.BoxTooLarge):
            log.warn("ending the session of {peer}: {why} (--max-box-bytes)",
                     peer=self.peer, why=str(error))
            self.emit(session_commands.session_ended_box(
                "limit",
                f"the server ended the session: the client sent {error} "
                "(the server's --max-box-bytes)",
            ))
            self._flush_cork()
        super().refuse_boxes(error)

    def connectionLost(self, reason):
        """Drop every handle and stream and remove the work directory."""
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self.environment is not None:
            handles = len(self.environment)
            self.environment.close()
            log.debug("session from {peer} ended ({handles} handles dropped)",
                     peer=self.peer, handles=handles)
        super().connectionLost(reason)

    # -- responders ------------------------------------------------------

    @session_commands.Hello.responder
    def hello(self, protocol, version, implementation=None):
        """Identify ourselves (the client checks protocol and version)."""
        if (protocol != session_commands.SESSION_PROTOCOL
                or version != session_commands.SESSION_VERSION):
            log.warn("{peer} says hello with {protocol!r} version {version}",
                     peer=self.peer, protocol=protocol, version=version)
        return {
            "protocol": session_commands.SESSION_PROTOCOL,
            "version": session_commands.SESSION_VERSION,
            "implementation": f"tvm_rpc {__version__} (pid {os.getpid()})",
            "chunk_size": session_commands.CHUNK_SIZE,
            "window": session_commands.WINDOW,
            "max_inline_value": session_commands.MAX_INLINE_VALUE,
        }

    @session_commands.GetFunction.responder
    def get_function(self, name):
        """Give a handle to a global function."""
        return {"function": self.environment.add(self.environment.lookup(name))}

    @session_commands.Free.responder
    def free(self, handles):
        """Drop handles."""
        for handle in handles:
            self._callees.pop(handle, None)
        self.environment.free(handles)
        return {}

    @session_commands.LoadModule.responder
    def load_module(self, path):
        """Load a module from the work directory."""
        module = self.environment.load_module(path)
        kind = "python" if isinstance(module, PythonModule) else "tvm"
        return {"module": self.environment.add(module), "kind": kind}

    @session_commands.ModuleGetFunction.responder
    def module_get_function(self, module, name, query_imports=False):
        """Give a handle to a module's function."""
        loaded = self.environment.get(module, "module")
        return {"function": self.environment.add_module_function(loaded, name,
                                                                 bool(query_imports))}

    @session_commands.DeviceExists.responder
    def device_exists(self, device_type, device_id):
        """Whether a device exists here."""
        device = values.DLDevice(device_type, device_id)
        return {"exists": self.environment.device_exists(device), "name": device.name}

    @session_commands.DeviceSync.responder
    def device_sync(self, device_type, device_id):
        """Wait for a device."""
        self.environment.device_sync(values.DLDevice(device_type, device_id))
        return {}

    @session_commands.Empty.responder
    def empty(self, shape, dtype, device_type, device_id):
        """Allocate an array."""
        handle, nbytes = self.environment.empty(shape, dtype, values.DLDevice(device_type, device_id))
        return {"array": handle, "nbytes": nbytes}

    @session_commands.OpenArrayWrite.responder
    def open_array_write(self, array):
        """Open a stream filling an array."""
        return _stream_and_size(self.environment.open_array_write(array))

    @session_commands.OpenArrayRead.responder
    def open_array_read(self, array):
        """Open a stream reading an array."""
        stream, ref = self.environment.open_array_read(array)
        return {"stream": stream, "size": ref.nbytes, "shape": list(ref.shape), "dtype": ref.dtype}

    @session_commands.OpenUpload.responder
    def open_upload(self, path, size=None):
        """Open a stream writing a file."""
        return {"stream": self.environment.open_upload(path, size)}

    @session_commands.OpenDownload.responder
    def open_download(self, path):
        """Open a stream reading a file."""
        return _stream_and_size(self.environment.open_download(path))

    @session_commands.OpenValue.responder
    def open_value(self, size):
        """Open a stream collecting a long encoded value."""
        return {"stream": self.environment.open_value(size)}

    @session_commands.StreamWrite.responder
    def stream_write(self, stream, data):
        """Consume a chunk; answer once it is consumed."""
        result = self.environment.stream_write(stream, data)
        if isinstance(result, Deferred):
            return result.addCallback(lambda _: {})
        return {}

    @session_commands.StreamFinish.responder
    def stream_finish(self, stream):
        """End a write stream."""
        return {"size": self.environment.stream_finish(stream)}

    @session_commands.StreamRead.responder
    def stream_read(self, stream, offset, length):
        """Serve a chunk of a read stream."""
        return {"data": self.environment.stream_read(stream, offset, length)}

    @session_commands.StreamClose.responder
    def stream_close(self, stream):
        """Cancel or release a stream."""
        self.environment.stream_close(stream)
        return {}

    @session_commands.TimeEvaluator.responder
    def time_evaluator(self, device_type, device_id, number, repeat, min_repeat_ms,
                       function=None, name=None, args=None, args_stream=None, options=None):
        """Time a function on the device; TVM's options a client omitted take their defaults."""
        callee = self._callee(function, name)
        arguments = self._arguments(args, args_stream)
        results = self.environment.time_evaluator(
            callee, values.DLDevice(device_type, device_id), number, repeat, min_repeat_ms,
            arguments, origin=None if function is None else self.environment.origin(function),
            options=_time_evaluator_options(options),
        )
        return {"results": results}

    @session_commands.Goodbye.responder
    def goodbye(self, keep=None):
        """
        Answer, then end the session; when the client asks to keep this
        worker and it may be kept (L{keeper}), the answer holds the token of
        its next session.
        """
        self._reactor().callLater(0, self.transport.loseConnection)
        if self.keeper is None:
            return {}
        answer = self.keeper(bool(keep) and not self._refused)
        self.kept = bool(answer)
        return answer


def _stream_and_size(opened):
    """@return: the answer of a command that opened a stream: its id and size."""
    stream, size = opened
    return {"stream": stream, "size": size}


def _time_evaluator_options(options):
    """
    @param options: a L{TimeEvaluator<session_commands.TimeEvaluator>}'s
        C{options} argument: L{None}, or a list of one dict whose omitted
        entries are L{None}.
    @return: the options given, by name.
    @raise ValueError: for a list of other than one box.
    """
    if options is None:
        return None
    if len(options) != 1:
        raise ValueError(f"time_evaluator options must be one box, not {len(options)}")
    return {key: value for key, value in options[0].items() if value is not None}


def make_session_protocol(work_root=None, registry=None, *, clock=None, backend="auto",
                          settings=None):
    """
    Make the protocol for one session; see the module docstring.

    @param work_root: where session work directories are created.
    @param registry: the global functions (the process-wide registry when L{None}).
    @param clock: an L{IReactorTime} (the global reactor when L{None}).
    @param backend: the array backend preference (see L{prepare}).
    @param settings: the operator's L{SessionSettings} (defaults when L{None}).
    @return: a L{SessionProtocol} (an L{IProtocol}).
    """
    return SessionProtocol(work_root, registry, clock=clock, backend=backend, settings=settings)

"""The session's command vocabulary: AMP commands between our client and our server.

After the RPC handshake the bytes of the connection belong to a
L{twisted.protocols.amp.AMP} conversation. The client calls, the server
answers; every command below lists its typed C{arguments}, its C{response}
and its C{errors}. The call model:

B{Opening.}
The client first calls L{Hello} (C{protocol="tvm_rpc-session"},
C{version=SESSION_VERSION}). A server that answers anything else, or does
not answer within a few seconds, is not a tvm_rpc session server (a real
TVM server answers nothing we can parse): the client reports the protocol
mismatch instead of hanging. The answer also gives the transfer
parameters (C{chunk_size}, C{window}).

B{Handles.}
The server keeps one table per session that maps integer ids to
functions, modules, arrays and streams. Ids are never reused within a
session. L{Free} drops ids (unknown ids are ignored, so freeing
twice is harmless); everything is dropped when the session ends.

B{Values.}
Arguments and results of calls are encoded with
L{tvm_rpc.protocol.values} (never pickle) and carried as raw bytes in
C{args} / C{result}. In values, functions and modules appear as
L{Handle<tvm_rpc.protocol.values.Handle>}, server arrays as
L{ArrayRef<tvm_rpc.protocol.values.ArrayRef>}, small host arrays inline as
L{HostArray<tvm_rpc.protocol.values.HostArray>} (the server turns them into
arrays before the call) and devices as
L{DLDevice<tvm_rpc.protocol.values.DLDevice>}.

B{Calls.}
L{GetFunction} turns a global name into a function handle;
L{CallFunction} calls a handle, or a global name directly, with the
encoded argument list and answers the encoded result. Many calls may be
in flight at once on one session. The built-ins exist under TVM's names
and are called like any function: C{tvm.rpc.server.upload(path, data)},
C{.download(path)} -> bytes, C{.remove(path)}, C{.listdir(path=".")}
-> list of names, C{.load_module(path)} -> module handle,
C{.workpath(path)} -> absolute path on the device; and
C{tvm_rpc.server.list_functions()} -> every name callable. A server
function may return a Deferred or be a coroutine function; its call is
answered when it completes while other calls proceed.
L{TimeEvaluator} times a function on the device (TVM's own timer
for functions of TVM modules).

B{Big values and bulk data: streams.}
No AMP value ever exceeds 65,535 bytes: a chunk of a stream is carried
in one box as consecutive values (L{Blob}). When encoded arguments
are longer than C{MAX_INLINE_VALUE}, the client opens a value sink
(L{OpenValue}), writes the bytes with L{StreamWrite}, ends it
with L{StreamFinish} and passes the stream id as C{args_stream}
(the call consumes the stream). A result too long to inline comes back
as C{result_stream} + C{result_size}: the client reads it with
L{StreamRead} and releases it with L{StreamClose}.
Uploads (L{OpenUpload}) and array fills (L{OpenArrayWrite})
are write streams; downloads (L{OpenDownload}) and array reads
(L{OpenArrayRead}) are read streams. Writes are sequential; each
L{StreamWrite} is answered once its chunk is consumed (written to
disk or into the array), and the writer keeps at most C{window} chunks
unanswered. Reads name their offset; the reader keeps at most C{window}
reads outstanding. So one transfer holds at most
C{window * chunk_size} (4 x 512 KiB = 2 MiB by default) in flight on
each end, whatever the total size; and the server stops reading requests
while its answers wait to be sent, so even a client that ignores the
window cannot make it buffer more than about one chunk. L{StreamClose} cancels a write
stream (a partial upload is deleted) or releases a read stream.
L{tvm_rpc.protocol.stream_table} implements the receiving end,
L{tvm_rpc.protocol.streams} the driving one.

B{Errors.}
Every exception raised on the server reaches the client as
L{RemoteError} carrying the remote exception's type name and
message, and its traceback text only when the server's operator asked
for it (C{--send-tracebacks}; the traceback shows the server's code and
paths). The session stays usable after an error.

B{Closing.}
L{Goodbye} asks the server to end the session (it answers, then
closes the connection); closing the connection has the same effect. When
the server ends a session itself (the C{-timeout=N} of the handshake ran
out), it sends L{SessionEnded} (C{code="timeout"}) to the client
first, so the client's outstanding calls fail with a session-timeout
error instead of a bare lost connection.

B{Caution for both ends.}
AMP drops the whole connection when an error answer reaches a Deferred
that has no errback yet: attach errbacks (or C{await}) before giving
control back to the reactor, and settle windowed commands at once (as
L{tvm_rpc.protocol.streams} does).
"""

from twisted.protocols import amp

from .remote_error import REMOTE_ERROR_CODE, RemoteError

#: The C{protocol} name exchanged by L{Hello}.
SESSION_PROTOCOL = "tvm_rpc-session"
#: The session protocol version; bumped on incompatible changes.
SESSION_VERSION = 1
#: Largest chunk carried by one L{StreamWrite} / L{StreamRead} (one
#: box, split into values of at most 65,535 bytes by L{Blob}).
CHUNK_SIZE = 512 * 1024
#: Chunks a writer or reader keeps outstanding on one stream.
WINDOW = 4
#: Longest encoded value sent inline in C{args} / C{result}; longer values
#: travel through a stream. Leaves room under AMP's 65,535-byte value limit.
MAX_INLINE_VALUE = 60 * 1024


class Blob(amp.Argument):
    """
    Bytes longer than one AMP value, carried in consecutive keys of one box:
    C{name}, C{name.1}, C{name.2}, ... each at most L{PIECE_SIZE} bytes,
    so no AMP value ever exceeds 65,535 bytes. The receiver checks the total
    length (a L{StreamWrite} chunk above L{CHUNK_SIZE} is refused by the
    stream table with a L{RemoteError}).
    """

    #: The longest single AMP value used (AMP's own limit is 65,535).
    PIECE_SIZE = 0xFFFF

    def toBox(self, name, strings, objects, proto):
        """Split the bytes of C{objects[name]} over C{name}, C{name.1}, ..."""
        value = objects.get(name.decode("ascii"))
        if value is None:
            if not self.optional:
                raise amp.InvalidSignature(f"missing required argument {name!r}")
            return
        # Slices of a memoryview: the box is serialized at once, so the only
        # copy is AMP's own join.
        view = memoryview(value).cast("B")
        size = self.PIECE_SIZE
        strings[name] = view[:size]
        for index, start in enumerate(range(size, len(view), size), 1):
            strings[b"%s.%d" % (name, index)] = view[start:start + size]

    def fromBox(self, name, strings, objects, proto):
        """Join C{name}, C{name.1}, ... back into one L{bytes}."""
        first = strings.pop(name, None)
        if first is None:
            if not self.optional:
                raise KeyError(name)
            objects[name.decode("ascii")] = None
            return
        pieces = [first]
        index = 1
        while True:
            piece = strings.pop(b"%s.%d" % (name, index), None)
            if piece is None:
                break
            pieces.append(piece)
            index += 1
        objects[name.decode("ascii")] = pieces[0] if len(pieces) == 1 else b"".join(pieces)


class SessionCommand(amp.Command):
    """
    A command of the session protocol: every failure on the answering end
    arrives as a declared L{RemoteError}.
    """

    errors = {RemoteError: REMOTE_ERROR_CODE}


class Hello(SessionCommand):
    """
    Identify both ends; the first command of every session.

    The server answers with its own protocol name and version. The client
    must check that C{protocol == SESSION_PROTOCOL} and that the version is
    one it speaks; a peer that is not a tvm_rpc session server never answers
    (so the client bounds the wait and reports the mismatch).
    """

    arguments = [
        (b"protocol", amp.Unicode()),
        (b"version", amp.Integer()),
        (b"implementation", amp.Unicode(optional=True)),
    ]
    response = [
        (b"protocol", amp.Unicode()),
        (b"version", amp.Integer()),
        (b"implementation", amp.Unicode()),
        (b"chunk_size", amp.Integer()),
        (b"window", amp.Integer()),
        (b"max_inline_value", amp.Integer()),
    ]


class GetFunction(SessionCommand):
    """
    Look up a global function (registry or built-in) by name.

    Response C{function}: a new function handle id. Raises L{RemoteError}
    (type C{tvm_rpc.server.registry.NoSuchFunction}) when nothing has that name.
    """

    arguments = [(b"name", amp.Unicode())]
    response = [(b"function", amp.Integer())]


class CallFunction(SessionCommand):
    """
    Call a function and answer its result.

    Exactly one of C{function} (a handle id) or C{name} (a global name)
    names the callee. The arguments are a list encoded with
    L{tvm_rpc.protocol.values.encode}: inline in C{args} (at most
    L{MAX_INLINE_VALUE} bytes), or in a finished value stream named by
    C{args_stream} (consumed by the call). Missing both means no arguments.

    The response holds the encoded result inline in C{result}, or, when it
    is longer than L{MAX_INLINE_VALUE}, a read stream C{result_stream} of
    C{result_size} bytes that the client reads and then closes.

    Both ends build and read these boxes with L{tvm_rpc.protocol.calls}
    (byte for byte what AMP writes for this schema).
    """

    arguments = [
        (b"function", amp.Integer(optional=True)),
        (b"name", amp.Unicode(optional=True)),
        (b"args", amp.String(optional=True)),
        (b"args_stream", amp.Integer(optional=True)),
    ]
    response = [
        (b"result", amp.String(optional=True)),
        (b"result_stream", amp.Integer(optional=True)),
        (b"result_size", amp.Integer(optional=True)),
    ]


class Free(SessionCommand):
    """Drop handles (functions, modules, arrays, streams); unknown ids are ignored."""

    arguments = [(b"handles", amp.ListOf(amp.Integer()))]
    response = []


class LoadModule(SessionCommand):
    """
    Load a module from a path in the session's work directory.

    A C{.py} file gives a module whose public functions are callable; a
    C{.so}/C{.tar}/C{.dylib}/C{.dll} built by TVM is loaded with
    C{tvm.runtime.load_module} when TVM's runtime is installed on the device
    (else L{RemoteError} says it is not). Response: the module handle id and
    its C{kind} (C{"python"} or C{"tvm"}).
    """

    arguments = [(b"path", amp.Unicode())]
    response = [(b"module", amp.Integer()), (b"kind", amp.Unicode())]


class ModuleGetFunction(SessionCommand):
    """
    Get a function of a loaded module by name.

    C{query_imports} also searches the module's imports (TVM modules).
    Response C{function}: a new function handle id.
    """

    arguments = [
        (b"module", amp.Integer()),
        (b"name", amp.Unicode()),
        (b"query_imports", amp.Boolean(optional=True)),
    ]
    response = [(b"function", amp.Integer())]


class DeviceExists(SessionCommand):
    """
    Whether a device exists on the server, by TVM's numbering
    (cpu=1, cuda=2, cuda_host=3, opencl=4, vulkan=7, metal=8, ...).
    C{name} is TVM's device name (C{"cpu"}, C{"cuda"}, ...).
    """

    arguments = [(b"device_type", amp.Integer()), (b"device_id", amp.Integer())]
    response = [(b"exists", amp.Boolean()), (b"name", amp.Unicode())]


class DeviceSync(SessionCommand):
    """Wait until all work queued on a device has finished."""

    arguments = [(b"device_type", amp.Integer()), (b"device_id", amp.Integer())]
    response = []


class Empty(SessionCommand):
    """
    Allocate an uninitialised array on a device.

    Response: the array handle id and its size in bytes.
    """

    arguments = [
        (b"shape", amp.ListOf(amp.Integer())),
        (b"dtype", amp.Unicode()),
        (b"device_type", amp.Integer()),
        (b"device_id", amp.Integer()),
    ]
    response = [(b"array", amp.Integer()), (b"nbytes", amp.Integer())]


class OpenArrayWrite(SessionCommand):
    """
    Open a write stream that fills an array from host bytes (C order).

    Response: the stream id and the number of bytes the array expects; the
    stream must carry exactly that many bytes before L{StreamFinish}.
    """

    arguments = [(b"array", amp.Integer())]
    response = [(b"stream", amp.Integer()), (b"size", amp.Integer())]


class OpenArrayRead(SessionCommand):
    """
    Open a read stream over an array's bytes (C order), for copying to host.

    Response: the stream id, its size in bytes, the shape and the dtype.
    """

    arguments = [(b"array", amp.Integer())]
    response = [
        (b"stream", amp.Integer()),
        (b"size", amp.Integer()),
        (b"shape", amp.ListOf(amp.Integer())),
        (b"dtype", amp.Unicode()),
    ]


class OpenUpload(SessionCommand):
    """
    Open a write stream into a file of the work directory (created or
    truncated; parent directories are created). C{size}, when given, is
    checked at L{StreamFinish}. A cancelled upload leaves no file.
    """

    arguments = [(b"path", amp.Unicode()), (b"size", amp.Integer(optional=True))]
    response = [(b"stream", amp.Integer())]


class OpenDownload(SessionCommand):
    """Open a read stream over a file of the work directory; answers its size."""

    arguments = [(b"path", amp.Unicode())]
    response = [(b"stream", amp.Integer()), (b"size", amp.Integer())]


class OpenValue(SessionCommand):
    """Open a write stream that collects an encoded value too long to inline."""

    arguments = [(b"size", amp.Integer())]
    response = [(b"stream", amp.Integer())]


class StreamWrite(SessionCommand):
    """
    Append a chunk (at most L{CHUNK_SIZE} bytes) to a write stream.

    Answered once the chunk is consumed, so a writer with at most L{WINDOW}
    writes outstanding bounds the memory both ends spend on the transfer.
    """

    arguments = [(b"stream", amp.Integer()), (b"data", Blob())]
    response = []


class StreamFinish(SessionCommand):
    """End a write stream; answers the number of bytes it received."""

    arguments = [(b"stream", amp.Integer())]
    response = [(b"size", amp.Integer())]


class StreamRead(SessionCommand):
    """
    Read up to C{length} (at most L{CHUNK_SIZE}) bytes at C{offset} of a
    read stream; an empty answer means the end.
    """

    arguments = [
        (b"stream", amp.Integer()),
        (b"offset", amp.Integer()),
        (b"length", amp.Integer()),
    ]
    response = [(b"data", Blob())]


class StreamClose(SessionCommand):
    """Cancel a write stream (partial data discarded) or release a read stream; idempotent."""

    arguments = [(b"stream", amp.Integer())]
    response = []


class TimeEvaluator(SessionCommand):
    """
    Time a function on the device, excluding the network.

    The callee is C{function} (a handle) or C{name}; C{args} /
    C{args_stream} as for L{CallFunction}. The function runs C{number}
    times per repeat, C{repeat} times; when C{min_repeat_ms} > 0 C{number}
    grows until one repeat lasts at least that long. The device is synced
    around each repeat. C{options}, optional, is a list of one box of
    TVM's other options (C{limit_zero_time_iterations},
    C{cooldown_interval_ms}, C{repeats_to_cooldown}, C{cache_flush_bytes},
    C{f_preproc}), each optional: an omitted one takes TVM's default (see
    L{tvm_rpc.protocol.evaluator_options}), so a peer that predates them
    is understood. Response C{results}: the mean seconds per call of each
    repeat (the client derives mean/median/min/max/std).
    """

    arguments = [
        (b"function", amp.Integer(optional=True)),
        (b"name", amp.Unicode(optional=True)),
        (b"args", amp.String(optional=True)),
        (b"args_stream", amp.Integer(optional=True)),
        (b"device_type", amp.Integer()),
        (b"device_id", amp.Integer()),
        (b"number", amp.Integer()),
        (b"repeat", amp.Integer()),
        (b"min_repeat_ms", amp.Float()),
        # One optional argument for the five: an omitted argument still costs
        # AMP a parse on every request, and this command is a tuning loop's.
        (b"options", amp.AmpList([
            (b"limit_zero_time_iterations", amp.Integer(optional=True)),
            (b"cooldown_interval_ms", amp.Integer(optional=True)),
            (b"repeats_to_cooldown", amp.Integer(optional=True)),
            (b"cache_flush_bytes", amp.Integer(optional=True)),
            (b"f_preproc", amp.Unicode(optional=True)),
        ], optional=True)),
    ]
    response = [(b"results", amp.ListOf(amp.Float()))]


class Goodbye(SessionCommand):
    """
    End the session: the server answers, drops everything and closes.

    With C{keep}, the client asks the server to keep this session's worker
    process for its next session on this server: a server that agrees
    answers a C{token} (presented with the next handshake's C{-resume=}
    option, see L{tvm_rpc.protocol.keys.resume_token}) and C{keep_for}, the
    seconds it keeps the worker waiting. Older peers ignore both.
    """

    arguments = [(b"keep", amp.Boolean(optional=True))]
    response = [
        (b"token", amp.Unicode(optional=True)),
        (b"keep_for", amp.Float(optional=True)),
    ]


class SessionEnded(amp.Command):
    """
    Sent by the server (no answer expected) just before it closes a session
    it ends itself: C{code} is C{"timeout"} when the session outlived the
    client's C{-timeout=N} (the worker was killed), C{"shutdown"} when the
    server stops, C{"limit"} when the client passed one of the server's
    limits (a box too large). The client should fail every outstanding call with an
    error saying so. Built as raw bytes by L{session_ended_box} because the
    worker that ran the session may already be dead.
    """

    arguments = [(b"code", amp.Unicode()), (b"reason", amp.Unicode())]
    requiresAnswer = False


def session_ended_box(code, reason):
    """
    @param code: C{"timeout"}, C{"shutdown"} or C{"limit"}.
    @param reason: a sentence for the user.
    @return: the serialized AMP box of a L{SessionEnded} command.
    """
    box = amp.AmpBox(
        _command=b"SessionEnded",
        code=code.encode("utf-8"),
        reason=reason.encode("utf-8")[:MAX_INLINE_VALUE],
    )
    return box.serialize()


#: Every session command, by class name.
SESSION_COMMANDS = {
    command.__name__: command
    for command in (
        Hello, GetFunction, CallFunction, Free, LoadModule, ModuleGetFunction,
        DeviceExists, DeviceSync, Empty, OpenArrayWrite, OpenArrayRead,
        OpenUpload, OpenDownload, OpenValue, StreamWrite, StreamFinish,
        StreamRead, StreamClose, TimeEvaluator, Goodbye, SessionEnded,
    )
}

"""
What a client session needs from the protocol engine under it.

L{RPCSession<tvm_rpc.client.rpc_session.RPCSession>} is the user's API; it
deals in remote objects (functions, modules, arrays, devices) and hands the
engine plain handle ids and wire values
(L{tvm_rpc.protocol.values}: scalars, containers,
L{Handle<tvm_rpc.protocol.values.Handle>},
L{ArrayRef<tvm_rpc.protocol.values.ArrayRef>}, devices,
L{HostArray<tvm_rpc.protocol.values.HostArray>}). An engine speaks one
session protocol on one connection: L{AMPEngine<tvm_rpc.client.amp_engine.AMPEngine>}
speaks ours, L{TVMEngine<tvm_rpc.client.tvm_engine.TVMEngine>} TVM's own.
Every method that talks to the server returns a
L{Deferred<twisted.internet.defer.Deferred>}; once the session is over they
fail with a L{SessionClosed<tvm_rpc.client.session_errors.SessionClosed>}
saying why.

A command that makes something on the server (a handle, a stream) and is
cancelled before its answer still awaits the answer and releases what it
made, so cancelling never leaks on the server. L{EngineState} is what the
engines keep alike; L{guarded} hands out such a command's answer.
"""

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from ..protocol.evaluator_options import TIME_EVALUATOR_OPTIONS

log = Logger()

#: Longest encoded result of one call accepted by default (256 MiB). A result
#: is held whole (its chunks, then joined, then decoded), while arrays and
#: modules come back as handles and files through download(): a bigger
#: result is almost surely a mistake or a hostile server. Raise it per
#: session with C{max_result_size}.
DEFAULT_MAX_RESULT_SIZE = 256 << 20


class ISessionEngine(Interface):
    """One session protocol driven on one connection, for an L{RPCSession}."""

    protocol_name = Attribute(
        "The name of the session protocol spoken (C{'tvm_rpc'} for ours, C{'tvm'} for TVM's).")
    connection = Attribute(
        "The Twisted protocol object that carries the session on its transport.")
    closed = Attribute("Whether the session is over or closing (nothing new is sent).")

    def configure(chunk_size, window, max_result_size):
        """
        Set the transfer parameters: bulk data moves in chunks of at most
        C{chunk_size} bytes with at most C{window} chunks in flight, and a
        call's result longer than C{max_result_size} bytes is refused unread.
        """

    def when_closed():
        """@return: a Deferred firing with L{None} once the connection is gone."""

    def abandon():
        """The session's object was garbage-collected: close the connection, best-effort."""

    def call(function, name, args, convert):
        """
        Call a remote function.

        @param function: the callee's handle id, or L{None} to call by C{name}.
        @param name: the callee's global name, or L{None}.
        @param args: the list of wire values to pass.
        @param convert: called with the decoded result (a wire value); what it
            returns is the call's result.
        @return: a Deferred of the converted result.
        """

    def get_function(name):
        """@return: a Deferred of the handle id of the global function C{name}."""

    def module_function(module, name, query_imports):
        """@return: a Deferred of the handle id of function C{name} of module handle C{module}."""

    def free(handle):
        """
        Release C{handle} on the server soon (called by finalizers: never
        raises, sends nothing itself).
        """

    def upload(data, target):
        """
        @param data: a local path, or a bytes-like object.
        @param target: the path on the server (required for bytes).
        @return: a Deferred of the number of bytes uploaded.
        """

    def download(path, local_path):
        """@return: a Deferred of the file's bytes, or of the number of bytes
        written to C{local_path} when it is not L{None}."""

    def load_module(path):
        """@return: a Deferred of C{(handle, kind)} of the module loaded from C{path}."""

    def device_exists(device_type, index):
        """@return: a Deferred of whether the device exists on the server."""

    def device_sync(device_type, index):
        """@return: a Deferred firing with L{None} once the device finished its work."""

    def empty(shape, dtype, device_type, index):
        """@return: a Deferred of the handle id of a new uninitialised array."""

    def write_array(handle, data, what):
        """
        Overwrite an array with raw C-order bytes.

        @param what: the array, for error messages.
        @return: a Deferred firing once the data is on the device.
        """

    def read_array(handle):
        """@return: a Deferred of the raw C-order bytes of an array."""

    def time_evaluator(function, name, args, device_type, index, number, repeat,
                       min_repeat_ms, options):
        """
        Time a function on the device (see
        L{RPCSession.time_evaluator<tvm_rpc.client.rpc_session.RPCSession.time_evaluator>}).

        @param options: TVM's other options, a dict with the keys of
            L{TIME_EVALUATOR_OPTIONS}.

        @return: a Deferred of the list of per-repeat seconds.
        """

    def close(timeout):
        """
        End the session politely; drop the connection after C{timeout}
        seconds. Idempotent.

        @return: a Deferred firing with L{None} once the connection is gone.
        """


def guarded(asking, orphan):
    """
    Hand out the answer of a request that creates something on the server
    (a handle, a stream), so that cancelling never leaks there.

    @param asking: the request's Deferred.
    @param orphan: called with the answer when the caller cancelled before
        it came: releases what it created.
    @return: a cancellable Deferred of the answer; cancelling it leaves the
        request waiting for its answer.
    """
    cancelled = []
    result = Deferred(lambda _: cancelled.append(True))

    def arrived(answer):
        if cancelled:
            try:
                orphan(answer)
            except Exception:
                log.failure("releasing what a cancelled request made")
        else:
            result.callback(answer)

    def failed(failure):
        if not cancelled:
            result.errback(failure)

    asking.addCallbacks(arrived, failed)
    return result


class EngineState:
    """
    Mixin of what both engines keep alike: the connection, whether the
    session is over, and the queue of releases sent on the next reactor
    turn. The class using it has C{_protocol} (with C{lost}, C{ended}
    and C{when_lost()}), C{_clock}, C{_close_started}, C{_to_free},
    C{_free_call} and C{_flush_free()}.
    """

    __slots__ = ()

    @property
    def connection(self):
        """The Twisted protocol object under the session."""
        return self._protocol

    @property
    def closed(self):
        """Whether the session is over or closing (no new calls are sent)."""
        return self._protocol.ended or self._close_started

    def when_closed(self):
        """@return: a Deferred firing with L{None} once the connection is gone."""
        return self._protocol.when_lost()

    def _schedule_free(self, item):
        """Queue C{item} for C{_flush_free()} on the next reactor turn (sends nothing now)."""
        self._to_free.append(item)
        if self._free_call is None:
            self._free_call = self._clock.callLater(0, self._flush_free)


__all__ = [
    "DEFAULT_MAX_RESULT_SIZE",
    "EngineState",
    "ISessionEngine",
    "TIME_EVALUATOR_OPTIONS",
    "guarded",
]

"""The driving end of chunked bulk transfers by stream id over AMP, bounded memory.

The end that receives a transfer keeps its streams in a
L{StreamTable<tvm_rpc.protocol.stream_table.StreamTable>}; the other end
drives it with the functions here: L{write_stream} pushes chunks into a
write stream, L{read_stream} pulls a read stream in order, and
L{send_value}/L{receive_value} pass long encoded call arguments and results
through value streams (short ones stay inline in the call's box).

Each transfer keeps at most C{window} commands outstanding and each command
carries at most C{chunk_size} bytes, and a write is answered only once its
chunk is consumed, so a transfer holds at most C{window * chunk_size} bytes in
flight (4 x 512 KiB = 2 MiB by default) on each end, whatever its total size.
Cancelling the Deferred of a transfer stops it and closes the stream on the
other end.

The errors of both ends are defined here: their qualified names
(C{tvm_rpc.protocol.streams.StreamError}, ...) are what a
L{RemoteError<tvm_rpc.protocol.remote_error.RemoteError>} carries on the
wire.
"""

import attrs
from twisted.internet.defer import Deferred, ensureDeferred

from .session_commands import (
    CHUNK_SIZE,
    MAX_INLINE_VALUE,
    WINDOW,
    OpenValue,
    StreamClose,
    StreamFinish,
    StreamRead,
    StreamWrite,
)


class StreamError(Exception):
    """A stream that does not exist, a chunk too large, a size mismatch."""


class ResultTooLarge(StreamError):
    """A result longer than the receiver accepts."""


class TooManyStreams(StreamError):
    """A stream opened beyond the most a session may hold open at once."""


def chunked(data, chunk_size=CHUNK_SIZE):
    """
    @param data: a bytes-like object.
    @return: an iterator over pieces of at most C{chunk_size} bytes (no copies:
        pieces are memoryview slices).
    """
    view = memoryview(data).cast("B")
    return (view[start:start + chunk_size] for start in range(0, len(view), chunk_size))


def file_chunks(file, chunk_size=CHUNK_SIZE):
    """
    @param file: a binary file object open for reading.
    @return: an iterator reading it C{chunk_size} bytes at a time.
    """
    return iter(lambda: file.read(chunk_size), b"")


@attrs.frozen
class _Failed:
    """A failed outstanding command, held until its turn comes."""

    failure: object


def _settled(deferred):
    """
    Catch an outstanding command's failure at once: AMP drops the connection
    when an error answer reaches a Deferred that has no errback yet, and a
    windowed transfer awaits its commands one after the other.
    """
    return deferred.addErrback(_Failed)


async def _outcome(deferred):
    """Wait for a settled command. @return: its answer. @raise Exception: its failure."""
    result = await deferred
    if isinstance(result, _Failed):
        result.failure.raiseException()
    return result


async def _close_quietly(call_remote, stream):
    """Close C{stream} on the peer, ignoring failures (it may be gone already)."""
    try:
        await call_remote(StreamClose, stream=stream)
    except Exception:
        pass


async def _write_stream(call_remote, stream, chunks, window, finish_command):
    """The body of L{write_stream}."""
    outstanding = []
    try:
        for chunk in chunks:
            outstanding.append(
                _settled(call_remote(StreamWrite, stream=stream, data=chunk))
            )
            if len(outstanding) >= window:
                await _outcome(outstanding.pop(0))
        while outstanding:
            await _outcome(outstanding.pop(0))
        response = await call_remote(finish_command, stream=stream)
        return response["size"]
    except BaseException:
        await _close_quietly(call_remote, stream)
        raise


def write_stream(call_remote, stream, chunks, *, window=WINDOW):
    """
    Push chunks into a write stream of the peer, then finish it.

    @param call_remote: the peer protocol's C{callRemote}.
    @param stream: the stream id (from an C{Open*} command).
    @param chunks: an iterable of bytes-likes, each at most the peer's chunk size.
    @param window: the most writes kept unanswered.
    @return: a L{Deferred} firing with the size the peer received. Cancelling it
        stops the transfer and closes the stream on the peer.
    """
    return ensureDeferred(_write_stream(call_remote, stream, chunks, window, StreamFinish))


async def _read_stream(call_remote, stream, size, consumer, window, chunk_size, close):
    """The body of L{read_stream}."""
    outstanding = []
    offset = 0
    received = 0
    try:
        while offset < size or outstanding:
            while offset < size and len(outstanding) < window:
                length = min(chunk_size, size - offset)
                outstanding.append((length, _settled(
                    call_remote(StreamRead, stream=stream, offset=offset, length=length)
                )))
                offset += length
            length, pending = outstanding.pop(0)
            data = (await _outcome(pending))["data"]
            if len(data) != length:
                raise StreamError(
                    f"stream {stream} gave {len(data)} bytes at {received}, expected {length}"
                )
            received += length
            result = consumer(data)
            if isinstance(result, Deferred):
                await result
        return received
    finally:
        if close:
            await _close_quietly(call_remote, stream)


def read_stream(call_remote, stream, size, consumer, *, window=WINDOW,
                chunk_size=CHUNK_SIZE, close=True):
    """
    Pull a read stream of the peer, in order, into C{consumer}.

    @param call_remote: the peer protocol's C{callRemote}.
    @param stream: the stream id (from an C{Open*} command).
    @param size: the stream's size (from the same answer).
    @param consumer: called with each chunk in order; may return a Deferred
        to slow the transfer down.
    @param window: the most reads kept outstanding.
    @param close: release the stream on the peer at the end (and on error).
    @return: a L{Deferred} firing with the number of bytes read. Cancelling
        it stops the transfer and releases the stream.
    """
    return ensureDeferred(
        _read_stream(call_remote, stream, size, consumer, window, chunk_size, close)
    )


async def _send_value(call_remote, encoded, window):
    """The body of L{send_value}."""
    if len(encoded) <= MAX_INLINE_VALUE:
        return {"args": encoded}
    stream = (await call_remote(OpenValue, size=len(encoded)))["stream"]
    await _write_stream(call_remote, stream, chunked(encoded), window, StreamFinish)
    return {"args_stream": stream}


def send_value(call_remote, encoded, *, window=WINDOW):
    """
    Prepare encoded call arguments: inline when short, else through a value
    stream.

    @param encoded: the bytes from L{tvm_rpc.protocol.values.encode}.
    @return: a Deferred of the keyword arguments to add to
        L{CallFunction<tvm_rpc.protocol.session_commands.CallFunction>} or
        L{TimeEvaluator<tvm_rpc.protocol.session_commands.TimeEvaluator>}
        (C{{"args": ...}} or C{{"args_stream": ...}}).
    """
    return ensureDeferred(_send_value(call_remote, encoded, window))


async def _receive_value(call_remote, response, window, max_size):
    """The body of L{receive_value}."""
    if response.get("result") is not None:
        return response["result"]
    stream = response.get("result_stream")
    if stream is None:
        raise StreamError("answer carries neither result nor result_stream")
    size = response["result_size"]
    if max_size is not None and not 0 <= size <= max_size:
        # Released without waiting: the refusal does not depend on the peer.
        ensureDeferred(_close_quietly(call_remote, stream))
        raise ResultTooLarge(
            f"the server announced a result of {size} bytes, above this client's "
            f"limit of {max_size} bytes (max_result_size): refused without reading it"
        )
    parts = []
    await _read_stream(call_remote, stream, size, parts.append, window, CHUNK_SIZE, True)
    return b"".join(parts)


def receive_value(call_remote, response, *, window=WINDOW, max_size=None):
    """
    Get the encoded result of a call answer, reading its stream if it has one.

    @param response: the answer of L{CallFunction<tvm_rpc.protocol.session_commands.CallFunction>}.
    @param max_size: the longest streamed result accepted, or L{None} for
        any; a longer one is refused before a byte of it is read.
    @return: a Deferred of the encoded bytes (decode with
        L{tvm_rpc.protocol.values.decode}); it fails with L{ResultTooLarge}
        for a result above C{max_size} (its stream is closed).
    """
    return ensureDeferred(_receive_value(call_remote, response, window, max_size))


__all__ = [
    "ResultTooLarge",
    "StreamError",
    "TooManyStreams",
    "chunked",
    "file_chunks",
    "read_stream",
    "receive_value",
    "send_value",
    "write_stream",
]

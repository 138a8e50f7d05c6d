"""Chunked bulk transfer by stream id over AMP, both directions, bounded memory.

Bulk data (uploads, downloads, array copies, long encoded values) never
travels in one AMP box. The receiving end of a transfer keeps a
:class:`StreamTable` of open streams by integer id:

- a *write stream* wraps an :class:`ISink` (a file being uploaded, an array
  being filled, a long value being collected); the peer pushes chunks with
  :class:`~tvm_rpc.protocol.session_commands.StreamWrite` and ends with
  :class:`~tvm_rpc.protocol.session_commands.StreamFinish`;
- a *read stream* wraps an :class:`ISource` (a file being downloaded, an
  array being copied to host, a long result); the peer pulls chunks by offset
  with :class:`~tvm_rpc.protocol.session_commands.StreamRead`.

Either kind is cancelled or released by
:class:`~tvm_rpc.protocol.session_commands.StreamClose`.
This module does no I/O: the sinks and sources here hold bytes in memory;
those over files are the server's (:mod:`tvm_rpc.server.workdir`), those
over arrays too (:mod:`tvm_rpc.server.array_streams`).

The other end drives transfers with :func:`write_stream` and
:func:`read_stream`. Each keeps at most ``window`` commands outstanding and
each command carries at most ``chunk_size`` bytes, and a write is answered only
once its chunk is consumed, so a transfer holds at most
``window * chunk_size`` bytes in flight (4 x 512 KiB = 2 MiB by default)
on each end, whatever its total size. Cancelling the Deferred of a transfer
stops it and closes the stream on the other end.
"""

import itertools

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

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

log = Logger()


class StreamError(Exception):
    """A stream that does not exist, a chunk too large, a size mismatch."""


class ResultTooLarge(StreamError):
    """A result longer than the receiver accepts."""


class TooManyStreams(StreamError):
    """A stream opened beyond the most a session may hold open at once."""


class ISink(Interface):
    """Where the chunks of a write stream go."""

    def write(data):
        """
        Consume a chunk.

        @return: L{None} when consumed, or a L{Deferred} that fires once it is.
        """

    def finish():
        """
        End the stream.

        @return: the number of bytes received.
        @raise Exception: when the data is incomplete or invalid.
        """

    def cancel():
        """Abandon the stream and discard what was received (idempotent)."""


class ISource(Interface):
    """Where the chunks of a read stream come from."""

    size = Attribute("The total size in bytes.")

    def read(offset, length):
        """@return: up to C{length} bytes at C{offset}; empty at the end."""

    def close():
        """Release the source (idempotent)."""


def _check_chunk(data, chunk_size):
    """@raise StreamError: when C{data} is longer than C{chunk_size}."""
    if len(data) > chunk_size:
        raise StreamError(f"chunk of {len(data)} bytes exceeds the {chunk_size}-byte limit")


@implementer(ISink)
@attrs.define(eq=False)
class BytesSink:
    """
    Collect a stream in memory, refusing more than C{limit} bytes.

    @ivar limit: the most bytes accepted.
    @ivar expected: when not L{None}, the exact size required at L{finish}.
    """

    limit: int
    expected: "int | None" = None
    _buffer: bytearray = attrs.field(factory=bytearray)
    finished: bool = False

    def write(self, data):
        """Append C{data}. @raise StreamError: beyond the limit."""
        if len(self._buffer) + len(data) > self.limit:
            raise StreamError(f"stream exceeds its announced {self.limit} bytes")
        self._buffer += data

    def finish(self):
        """@return: the size. @raise StreamError: when short of C{expected}."""
        if self.expected is not None and len(self._buffer) != self.expected:
            raise StreamError(
                f"stream ended after {len(self._buffer)} of {self.expected} bytes"
            )
        self.finished = True
        return len(self._buffer)

    def cancel(self):
        """Forget the data."""
        self._buffer = bytearray()

    def getvalue(self):
        """@return: the bytes received."""
        return bytes(self._buffer)


@implementer(ISource)
@attrs.define(eq=False)
class BytesSource:
    """Serve chunks of a bytes-like object held in memory (no copy until read)."""

    _data: memoryview = attrs.field(converter=lambda data: memoryview(data).cast("B"))

    @property
    def size(self):
        """The total size in bytes."""
        return len(self._data)

    def read(self, offset, length):
        """
        @return: up to C{length} bytes at C{offset}, as a view of the data (the
            answer box is serialized at once, so it is never held).
        """
        return self._data[offset:offset + length]

    def close(self):
        """Drop the reference to the data."""
        self._data = memoryview(b"")


@attrs.define(eq=False)
class StreamTable:
    """
    The open streams of one session, by id.

    @ivar chunk_size: the largest chunk accepted or served.
    @ivar next_id: a callable returning fresh ids (shared with the session's
        handle table, so ids never collide).
    @ivar max_streams: the most streams open (or finished and not yet
        consumed) at once, or L{None} for no limit.
    """

    chunk_size: int = CHUNK_SIZE
    next_id: object = attrs.field(factory=lambda: itertools.count(1).__next__)
    max_streams: "int | None" = None
    _sinks: dict = attrs.field(factory=dict)
    _sources: dict = attrs.field(factory=dict)
    finished_values: dict = attrs.field(factory=dict)

    def _open(self, streams, end, release):
        """
        Give a sink or a source a fresh stream id.

        @param streams: where it is kept (the sinks or the sources).
        @param end: the sink or source.
        @param release: cancels or closes it.
        @return: its new stream id.
        @raise TooManyStreams: at the limit (after calling C{release}).
        """
        if self.max_streams is not None and len(self) >= self.max_streams:
            release()
            raise TooManyStreams(
                f"too many open streams in this session (the server's limit is "
                f"{self.max_streams}): finish or close some before opening more"
            )
        stream = self.next_id()
        streams[stream] = end
        return stream

    def open_sink(self, sink):
        """
        @param sink: an L{ISink}.
        @return: its new stream id.
        @raise TooManyStreams: at the limit (the sink is cancelled).
        """
        return self._open(self._sinks, sink, sink.cancel)

    def open_source(self, source):
        """
        @param source: an L{ISource}.
        @return: its new stream id.
        @raise TooManyStreams: at the limit (the source is closed).
        """
        return self._open(self._sources, source, source.close)

    def _sink(self, stream):
        """@return: the sink of an open write stream. @raise StreamError: when there is none."""
        try:
            return self._sinks[stream]
        except KeyError:
            raise StreamError(f"no open write stream {stream}") from None

    def write(self, stream, data):
        """
        Pass a chunk to a write stream's sink; a failing sink is cancelled
        and its stream closed.

        @return: L{None} or a L{Deferred} firing once the chunk is consumed.
        @raise StreamError: unknown stream or chunk too large.
        """
        sink = self._sink(stream)
        try:
            _check_chunk(data, self.chunk_size)
            return sink.write(data)
        except BaseException:
            self.close(stream)
            raise

    def finish(self, stream):
        """
        End a write stream. A finished L{BytesSink} (a value stream) is kept
        for L{take_finished}; any other sink is done with.

        @return: the number of bytes the sink received.
        @raise StreamError: unknown stream; or whatever the sink raises (the
            sink is then cancelled).
        """
        sink = self._sinks.pop(stream, None)
        if sink is None:
            raise StreamError(f"no open write stream {stream}")
        try:
            size = sink.finish()
        except BaseException:
            sink.cancel()
            raise
        if isinstance(sink, BytesSink):
            self.finished_values[stream] = sink
        return size

    def take_finished(self, stream):
        """
        Remove a finished value stream and return its bytes (how a call
        consumes its long arguments).

        @raise StreamError: when C{stream} is not a finished value stream.
        """
        sink = self.finished_values.pop(stream, None)
        if sink is None:
            raise StreamError(f"no finished value stream {stream}")
        return sink.getvalue()

    def read(self, stream, offset, length):
        """
        @return: up to C{length} bytes at C{offset} of a read stream.
        @raise StreamError: unknown stream, bad offset, length too large.
        """
        try:
            source = self._sources[stream]
        except KeyError:
            raise StreamError(f"no open read stream {stream}") from None
        if not 0 <= length <= self.chunk_size:
            raise StreamError(f"read length {length} outside 0..{self.chunk_size}")
        if not 0 <= offset:
            raise StreamError(f"negative read offset {offset}")
        return source.read(offset, length)

    def close(self, stream):
        """Cancel a write stream or release a read stream; unknown ids are ignored."""
        sink = self._sinks.pop(stream, None)
        if sink is not None:
            sink.cancel()
        self.finished_values.pop(stream, None)
        source = self._sources.pop(stream, None)
        if source is not None:
            source.close()
        return sink is not None or source is not None

    def __contains__(self, stream):
        """@return: whether C{stream} is open (or finished and not yet consumed)."""
        return stream in self._sinks or stream in self._sources or stream in self.finished_values

    def __len__(self):
        """@return: how many streams are open or waiting to be consumed."""
        return len(self._sinks) + len(self._sources) + len(self.finished_values)

    def close_all(self):
        """Cancel and release every stream (the session is over)."""
        for stream in list(self._sinks) + list(self._sources) + list(self.finished_values):
            try:
                self.close(stream)
            except Exception:
                log.failure("closing stream {stream}", stream=stream)


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
    "BytesSink",
    "BytesSource",
    "ISink",
    "ISource",
    "ResultTooLarge",
    "StreamError",
    "StreamTable",
    "TooManyStreams",
    "chunked",
    "file_chunks",
    "read_stream",
    "receive_value",
    "send_value",
    "write_stream",
]

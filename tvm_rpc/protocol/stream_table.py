"""The receiving end of chunked bulk transfers: open streams by id, bounded memory.

Bulk data (uploads, downloads, array copies, long encoded values) never
travels in one AMP box. The end that receives a transfer keeps a
L{StreamTable} of open streams by integer id:

  - a I{write stream} wraps an L{ISink} (a file being uploaded, an array
    being filled, a long value being collected); the peer pushes chunks with
    L{StreamWrite<tvm_rpc.protocol.session_commands.StreamWrite>} and ends
    with L{StreamFinish<tvm_rpc.protocol.session_commands.StreamFinish>};
  - a I{read stream} wraps an L{ISource} (a file being downloaded, an array
    being copied to host, a long result); the peer pulls chunks by offset
    with L{StreamRead<tvm_rpc.protocol.session_commands.StreamRead>}.

Either kind is cancelled or released by
L{StreamClose<tvm_rpc.protocol.session_commands.StreamClose>}. The end that
drives a transfer, and the errors both ends raise, are in
L{tvm_rpc.protocol.streams}.

This module does no I/O: the sinks and sources here hold bytes in memory;
those over files are the server's (L{tvm_rpc.server.workdir}), those over
arrays too (L{tvm_rpc.server.array_streams}).
"""

import itertools

import attrs
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from .session_commands import CHUNK_SIZE
from .streams import StreamError, TooManyStreams

log = Logger()


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

"""The stream ends over a session's arrays: filling one, and reading one a chunk at a time.

An array write stream wraps an L{ArraySink}; an array without a host
view (a tensor on a GPU, say) is read through a L{PiecewiseArraySource}
(one with a host view is served from that view by a
L{BytesSource<tvm_rpc.protocol.stream_table.BytesSource>}). Both reach the array only
through its L{IArrayBackend<tvm_rpc.server.backends.IArrayBackend>}.
"""

import attrs
from zope.interface import implementer

from ..protocol.stream_table import ISink, ISource
from ..protocol.streams import StreamError


@implementer(ISink)
@attrs.define(eq=False)
class ArraySink:
    """
    Fill an array from a write stream: straight into the array's memory when
    the backend exposes it (numpy, pure Python, TVM tensors on the cpu), else
    a chunk at a time onto its device (TVM tensors elsewhere), else into a
    host buffer copied to the array at the end.
    """

    backend: object
    array: object
    nbytes: int
    _view: object = None
    _buffer: object = None
    _piecewise: bool = False
    _offset: int = 0

    def __attrs_post_init__(self):
        """Choose how chunks reach the array (see the class docstring)."""
        self._view = self.backend.writable_view(self.array)
        if self._view is None:
            self._piecewise = self.backend.piecewise(self.array)
            if not self._piecewise:
                self._buffer = bytearray(self.nbytes)
                self._view = memoryview(self._buffer)

    def write(self, data):
        """Copy a chunk at the current offset. @raise StreamError: past the end."""
        end = self._offset + len(data)
        if end > self.nbytes:
            raise StreamError(f"array takes {self.nbytes} bytes; got more")
        if self._piecewise:
            if data:
                self.backend.write_at(self.array, self._offset, data)
        else:
            self._view[self._offset:end] = data
        self._offset = end

    def finish(self):
        """Check the size and move a host buffer into the array. @return: the size."""
        if self._offset != self.nbytes:
            raise StreamError(f"array takes {self.nbytes} bytes; got {self._offset}")
        if self._buffer is not None:
            self.backend.fill(self.array, self._buffer)
        self.cancel()
        return self.nbytes

    def cancel(self):
        """Drop the buffer (the array keeps what was written so far)."""
        self._view = None
        self._buffer = None


@implementer(ISource)
@attrs.define(eq=False)
class PiecewiseArraySource:
    """
    Serve an array without a host view (a tensor on a GPU, say) a chunk at a
    time, each copied from the device when asked for.
    """

    backend: object
    array: object
    size: int

    def read(self, offset, length):
        """@return: up to C{length} bytes at C{offset}."""
        length = max(0, min(length, self.size - offset))
        if not length:
            return b""
        return self.backend.read_at(self.array, offset, length)

    def close(self):
        """Drop the reference to the array."""
        self.array = None

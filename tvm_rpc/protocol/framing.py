"""The tracker's framing: an optional int32 magic, then C{[int32 length][UTF-8 JSON]}.

Sans-IO: L{FrameDecoder} turns any split of the byte stream into the same
sequence of JSON values and never raises; a bad stream sets L{FrameDecoder.error}
and the decoder stops there. L{encode_frame} builds one buffer so a reply
leaves in a single write (TVM's two writes cost ~44 ms per reply to Nagle and
delayed ACK).
"""

import json

import attrs

from .constants import INT32, MAX_TRACKER_FRAME, RPC_MAGIC, RPC_TRACKER_MAGIC


def encode_frame(value):
    """
    Encode one JSON value as a length-prefixed frame.

    @param value: anything C{json.dumps} accepts.
    @return: the frame, header and body in one L{bytes}.
    """
    body = json.dumps(value).encode("utf-8")
    return INT32.pack(len(body)) + body


#: Why a tracker refuses a peer that opened with the RPC handshake's magic.
WRONG_PORT_FOR_RPC = (
    f"wrong magic 0x{RPC_MAGIC:x}, the RPC handshake of a client or server: this is a "
    "tracker; RPC handshakes go to an rpc-server or rpc-proxy port"
)


def encode_magic():
    """@return: the tracker magic as it goes on the wire."""
    return INT32.pack(RPC_TRACKER_MAGIC)


@attrs.define
class FrameDecoder:
    """
    Incremental decoder of a tracker byte stream.

    @ivar expect_magic: whether the stream starts with L{RPC_TRACKER_MAGIC}
        (true on both ends of a tracker connection).
    @ivar max_length: the largest frame body accepted.
    @ivar greeted: whether the magic has arrived (always true without
        C{expect_magic}).
    @ivar error: why the stream was refused, or L{None}; once set, the decoder
        ignores all further input.
    """

    expect_magic: bool = True
    max_length: int = MAX_TRACKER_FRAME
    greeted: bool = attrs.field(init=False)
    error: "str | None" = attrs.field(init=False, default=None)
    _buffer: bytearray = attrs.field(init=False, factory=bytearray)

    def __attrs_post_init__(self):
        self.greeted = not self.expect_magic

    @property
    def pending(self):
        """The number of bytes held of a frame (or magic) not yet complete."""
        return len(self._buffer)

    def feed(self, data):
        """
        Take more bytes of the stream.

        @param data: the bytes received, in any chunking.
        @return: the JSON values completed by C{data}, in order, even when a
            later frame in the same data is bad.
        """
        if self.error is not None:
            return []
        self._buffer += data
        values = []
        if not self.greeted:
            if len(self._buffer) < INT32.size:
                return values
            (magic,) = INT32.unpack_from(self._buffer)
            if magic == RPC_MAGIC:
                return self._fail(values, WRONG_PORT_FOR_RPC)
            if magic != RPC_TRACKER_MAGIC:
                return self._fail(values, f"wrong magic 0x{magic & 0xFFFFFFFF:x}")
            del self._buffer[: INT32.size]
            self.greeted = True
        while len(self._buffer) >= INT32.size:
            (length,) = INT32.unpack_from(self._buffer)
            if length <= 0:
                return self._fail(values, f"bad frame length {length}")
            if length > self.max_length:
                return self._fail(
                    values, f"frame of {length} bytes exceeds {self.max_length}"
                )
            end = INT32.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[INT32.size : end])
            del self._buffer[:end]
            try:
                values.append(json.loads(body.decode("utf-8")))
            except UnicodeDecodeError:
                return self._fail(values, "frame is not UTF-8")
            except ValueError as e:
                return self._fail(values, f"frame is not JSON ({e})")
            except RecursionError:
                return self._fail(values, "frame nests too deeply")
        return values

    def _fail(self, values, reason):
        self.error = reason
        self._buffer.clear()
        return values

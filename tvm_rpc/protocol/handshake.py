"""The RPC handshake spoken on server and proxy ports.

The connecting side sends C{[RPC_MAGIC][int32 keylen][key]}; the accepting side
answers C{[int32 code]} and, on success, C{[int32 keylen][its own key]}. After
that the bytes belong to the session. Both decoders are sans-IO, never raise,
and keep whatever follows the handshake in C{rest} so nothing a peer sends
early is lost.
"""

import attrs

from .constants import INT32, RPC_CODE_SUCCESS, RPC_MAGIC, RPC_TRACKER_MAGIC

#: The longest key accepted: TVM keys are short; a peer announcing more is refused
#: at once instead of being buffered (TVM waits for an announced 1 GiB key).
MAX_KEY_LENGTH = 4096


#: Why a server or proxy port refuses a peer that opened with the tracker's magic.
WRONG_PORT_FOR_TRACKER = (
    f"wrong magic 0x{RPC_TRACKER_MAGIC:x}, the tracker protocol's: this port takes RPC "
    "handshakes (rpc-server, rpc-proxy); tracker clients go to the tracker's port"
)
#: Why the connecting side gives up on a peer that answers with the tracker's magic.
TRACKER_ANSWERED = (
    f"it answered 0x{RPC_TRACKER_MAGIC:x}, the tracker's magic: it is a tracker; "
    "point --host/--port at the proxy's port"
)


def encode_handshake(key):
    """@return: the bytes that open a connection presenting C{key}."""
    raw = key.encode("utf-8")
    return INT32.pack(RPC_MAGIC) + INT32.pack(len(raw)) + raw


def encode_reply(code, key=None):
    """
    @param code: one of the C{RPC_CODE_*} values.
    @param key: the accepting side's key, sent only with success.
    @return: the reply bytes.
    """
    if code != RPC_CODE_SUCCESS:
        return INT32.pack(code)
    raw = (key or "").encode("utf-8")
    return INT32.pack(code) + INT32.pack(len(raw)) + raw


def _read_key(buffer, offset, max_length):
    """
    Read C{[int32 len][utf-8]} at C{offset}.

    @return: C{(key, end)} when complete, C{(None, None)} when more bytes are
        needed.
    @raise ValueError: on a bad length or bad UTF-8.
    """
    if len(buffer) < offset + INT32.size:
        return None, None
    (length,) = INT32.unpack_from(buffer, offset)
    if length <= 0:
        raise ValueError(f"bad key length {length}")
    if length > max_length:
        raise ValueError(f"key length {length} exceeds {max_length}")
    end = offset + INT32.size + length
    if len(buffer) < end:
        return None, None
    try:
        key = bytes(buffer[offset + INT32.size : end]).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("key is not UTF-8") from None
    return key, end


@attrs.define
class _KeyDecoder:
    """
    What both decoders read: a leading int32, handed to the subclass's
    C{_leading_int32_read} (which returns whether the decoder is done), then
    perhaps a length-prefixed key.

    @ivar key: the peer's key once read, else L{None}.
    @ivar error: why the bytes are unreadable, else L{None}.
    @ivar rest: bytes received after the handshake.
    """

    max_key_length: int = MAX_KEY_LENGTH
    key: "str | None" = attrs.field(init=False, default=None)
    error: "str | None" = attrs.field(init=False, default=None)
    rest: bytes = attrs.field(init=False, default=b"")
    _buffer: bytearray = attrs.field(init=False, factory=bytearray)

    def feed(self, data):
        """
        @param data: more bytes, in any chunking.
        @return: whether the decoder is done.
        """
        if self.done:
            self.rest += data
            return True
        self._buffer += data
        if len(self._buffer) < INT32.size:
            return False
        return self._leading_int32_read(INT32.unpack_from(self._buffer)[0])

    def _take_key(self):
        """
        Read the key after the leading int32 into C{key} and C{rest}, or why
        it is unreadable into C{error}.

        @return: whether that is done (C{False}: more bytes are needed).
        """
        try:
            key, end = _read_key(self._buffer, INT32.size, self.max_key_length)
        except ValueError as e:
            self.error = str(e)
            return True
        if key is None:
            return False
        self.key = key
        self.rest = bytes(self._buffer[end:])
        self._buffer.clear()
        return True


@attrs.define
class HandshakeDecoder(_KeyDecoder):
    """
    The accepting side: decodes C{[RPC_MAGIC][int32 keylen][key]}.

    @ivar key: the peer's key once complete, else L{None}.
    @ivar error: why the handshake was refused, else L{None}.
    @ivar rest: bytes received after the handshake.
    """

    @property
    def done(self):
        """Whether the handshake ended, well or badly."""
        return self.key is not None or self.error is not None

    def _leading_int32_read(self, magic):
        """Check the magic, then read the key. @return: L{done}."""
        if magic == RPC_TRACKER_MAGIC:
            self.error = WRONG_PORT_FOR_TRACKER
            return True
        if magic != RPC_MAGIC:
            self.error = f"wrong magic 0x{magic & 0xFFFFFFFF:x}"
            return True
        return self._take_key()


@attrs.define
class ReplyDecoder(_KeyDecoder):
    """
    The connecting side: decodes C{[int32 code]} and, on success, the peer key.

    @ivar code: the reply code once known.
    @ivar key: the peer's key on success.
    @ivar error: why the reply is unreadable, else L{None}.
    @ivar rest: bytes received after the reply.
    """

    code: "int | None" = attrs.field(init=False, default=None)
    _done: bool = attrs.field(init=False, default=False)

    @property
    def done(self):
        """Whether the reply is complete or unreadable."""
        return self._done

    def _leading_int32_read(self, code):
        """Keep the code; on success read the key. @return: L{done}."""
        self.code = code
        if self.code != RPC_CODE_SUCCESS:
            self.rest = bytes(self._buffer[INT32.size :])
            self._done = True
            return True
        self._done = self._take_key()
        return self._done

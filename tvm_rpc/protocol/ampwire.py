"""AMP boxes on the wire, sans-IO: parse fast, serialize as AMP does.

Session commands are real L{twisted.protocols.amp} boxes (see
L{tvm_rpc.protocol.session_commands}). AMP's own receiver handles one length
prefixed string per method call; on the path of every remote call that cost
is most of a call. This module keeps the wire format byte for byte and makes
it cheaper:

  - L{BoxParser} turns received bytes into boxes (plain C{dict}s of C{bytes}
    to C{bytes}), one box per L{BoxParser.next_box}, resuming inside a box
    that arrives in pieces (only the unfinished key or value is kept as
    bytes, as AMP's parser does).
  - L{serialize} writes a box from C{(key, value)} pairs exactly as
    L{twisted.protocols.amp.AmpBox.serialize} does (keys sorted); the
    boxes of a remote call are built by L{tvm_rpc.protocol.calls}.

The protocol that reads and writes them on a connection is
L{tvm_rpc.lean_amp.LeanAMP}.
"""

import struct

import attrs

_LENGTH = struct.Struct("!H")
#: The longest key AMP allows.
MAX_KEY_LENGTH = 255
#: The longest value AMP allows.
MAX_VALUE_LENGTH = 0xFFFF


class BoxError(ValueError):
    """Bytes that are not AMP boxes (a key longer than AMP allows)."""


class BoxTooLarge(BoxError):
    """A box longer than the receiver accepts (finished or still arriving)."""


@attrs.define
class BoxParser:
    """
    Incremental AMP box parser: C{feed} bytes, then take boxes with
    C{next_box} until it returns L{None}.

    Boxes are plain C{dict}s of C{bytes} keys to C{bytes} values, in the
    order the keys arrived (an empty box, just the terminator, is a box).

    @ivar max_box_size: when not L{None}, the most bytes one box may take on
        the wire. It is checked whenever a box is still incomplete after the
        bytes received so far, so what is held for one box never exceeds it
        by more than one read; boxes that arrive whole cost nothing more.
    """

    max_box_size: "int | None" = None
    _data: bytes = b""
    _offset: int = 0
    _box: "dict | None" = None
    _key: "bytes | None" = None
    # Stream offsets (bytes fed before _data, and where the box being
    # received began), kept only to measure an incomplete box.
    _base: int = 0
    _box_start: int = 0

    def feed(self, data):
        """Add received bytes."""
        if self._offset >= len(self._data):
            self._base += len(self._data)
            self._data = bytes(data)
        else:
            self._base += self._offset
            self._data = self._data[self._offset:] + data
        self._offset = 0

    def next_box(self):
        """
        @return: the next complete box, or L{None} until more bytes arrive.
        @raise BoxError: for a key length above L{MAX_KEY_LENGTH} (the bytes
            cannot be AMP; the parser is unusable afterwards).
        @raise BoxTooLarge: for an incomplete box already longer than
            L{max_box_size} (the parser is unusable afterwards).
        """
        data = self._data
        position = self._offset
        end = len(data)
        box = self._box
        fresh = box is None
        if fresh:
            box = {}
            box_at = position
        key = self._key
        if key is None:
            # Whole key/value pairs in one step: the common case of a box
            # that arrived complete.
            while position + 2 <= end:
                length = (data[position] << 8) | data[position + 1]
                if length == 0:
                    self._offset = position + 2
                    self._box = None
                    return box
                if length > MAX_KEY_LENGTH:
                    raise BoxError(f"AMP key length {length} exceeds {MAX_KEY_LENGTH}")
                value_at = position + 2 + length
                value_start = value_at + 2
                if value_start > end:
                    break
                stop = value_start + ((data[value_at] << 8) | data[value_at + 1])
                if stop > end:
                    break
                box[data[position + 2:value_at]] = data[value_start:stop]
                position = stop
        while position + 2 <= end:
            length = (data[position] << 8) | data[position + 1]
            start = position + 2
            stop = start + length
            if key is None:
                if length == 0:
                    self._offset = start
                    self._box = None
                    self._key = None
                    return box
                if length > MAX_KEY_LENGTH:
                    raise BoxError(f"AMP key length {length} exceeds {MAX_KEY_LENGTH}")
                if stop > end:
                    break
                key = data[start:stop]
            else:
                if stop > end:
                    break
                box[key] = data[start:stop]
                key = None
            position = stop
        self._offset = position
        self._box = box
        self._key = key
        if self.max_box_size is not None:
            if fresh:
                self._box_start = self._base + box_at
            held = self._base + end - self._box_start
            if held > self.max_box_size:
                raise BoxTooLarge(
                    f"an AMP box of more than {self.max_box_size} bytes ({held} received "
                    "and not finished)"
                )
        return None


def serialize(pairs):
    """
    @param pairs: C{(key, value)} pairs of bytes (any order).
    @return: the box's bytes, identical to C{AmpBox(pairs).serialize()}.
    @raise BoxError: for a key or value too long for AMP.
    """
    parts = []
    for key, value in sorted(pairs):
        if not 0 < len(key) <= MAX_KEY_LENGTH:
            raise BoxError(f"bad AMP key length {len(key)}")
        if len(value) > MAX_VALUE_LENGTH:
            raise BoxError(f"AMP value for {key!r} is {len(value)} bytes, above {MAX_VALUE_LENGTH}")
        parts += (_LENGTH.pack(len(key)), key, _LENGTH.pack(len(value)), value)
    parts.append(b"\x00\x00")
    return b"".join(parts)

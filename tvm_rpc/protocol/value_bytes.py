"""The byte layer under the value codec of L{tvm_rpc.protocol.values}.

What every encoded value is built from, apart from the value types: the
version byte, the one-byte tags, unsigned LEB128 varints and zigzag integers,
L{CodecError} (the only error malformed input raises), the bounds-checked
L{Reader} the decoder walks with, and L{quick_decode}, which decodes the small
plain values of a typical call without the reader. Nothing here knows
handles, arrays or devices: L{tvm_rpc.protocol.values} builds those on top.
"""

import struct

import attrs

#: The first byte of every encoded value.
VERSION = 1

#: An IEEE 754 double, little-endian (the body of a float).
DOUBLE = struct.Struct("<d")


class CodecError(ValueError):
    """
    A value that cannot be encoded, or bytes that are not a valid encoding.

    Its qualified name is what a
    L{RemoteError<tvm_rpc.protocol.remote_error.RemoteError>} carries on the
    wire, and that name was born in L{tvm_rpc.protocol.values} (which
    imports it): it keeps it.
    """

    __module__ = "tvm_rpc.protocol.values"


#: The tag byte that starts each value, by kind.
TAG_NONE, TAG_TRUE, TAG_FALSE = b"NTF"
TAG_INT, TAG_FLOAT, TAG_STR, TAG_BYTES = b"ifsb"
TAG_LIST, TAG_TUPLE, TAG_DICT = b"lud"
TAG_HANDLE, TAG_ARRAY_REF, TAG_HOST_ARRAY, TAG_DEVICE = b"HAhD"
#: The values whose tag is their whole encoding.
SINGLETONS = {TAG_NONE: None, TAG_TRUE: True, TAG_FALSE: False}


def write_varint(number, out):
    """Append C{number} (non-negative) to C{out} as an unsigned LEB128 varint."""
    while True:
        low = number & 0x7F
        number >>= 7
        if number:
            out.append(low | 0x80)
        else:
            out.append(low)
            return


def zigzag(number):
    """@return: C{number} mapped to a non-negative int (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...)."""
    return number << 1 if number >= 0 else ((-number) << 1) - 1


@attrs.define
class Reader:
    """
    A cursor over the bytes being decoded (C{bytes}, or a byte
    C{memoryview}); every failure is a L{CodecError}.
    """

    data: object
    position: int = 0

    def byte(self):
        """@return: the next byte. @raise CodecError: at the end of the input."""
        position = self.position
        if position >= len(self.data):
            raise CodecError("truncated value")
        self.position = position + 1
        return self.data[position]

    def take(self, length):
        """@return: the next C{length} bytes (a slice). @raise CodecError: past the end."""
        end = self.position + length
        if end > len(self.data):
            raise CodecError(f"truncated value: wants {length} bytes at {self.position}")
        chunk = self.data[self.position:end]
        self.position = end
        return chunk

    def varint(self, limit=10):
        """Read an unsigned LEB128 varint of at most C{limit} bytes."""
        data = self.data
        position = self.position
        if position < len(data) and data[position] < 0x80:
            self.position = position + 1
            return data[position]
        result = shift = 0
        for _ in range(limit):
            byte = self.byte()
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
        raise CodecError("varint too long")

    def count(self):
        """A length or element count, at most the bytes that remain."""
        number = self.varint()
        if number > len(self.data) - self.position:
            raise CodecError(f"announced length {number} exceeds the remaining input")
        return number

    def text(self):
        """@return: a varint-prefixed UTF-8 string."""
        raw = self.take(self.count())
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise CodecError(f"invalid UTF-8 in string: {e}") from None

    def small(self):
        """A non-negative number below 2**31 (ids, device numbers, dimensions)."""
        number = self.varint(5)
        if number >= 1 << 31:
            raise CodecError(f"number {number} out of range")
        return number

    def shape(self):
        """@return: a varint rank followed by that many dimensions."""
        return tuple(self.small() for _ in range(self.count()))


#: Longest input tried by L{quick_decode} first.
QUICK_SIZE = 256
#: What L{quick_decode} returns for an input it leaves to the general decoder.
MISS = object()
_unpack_double = DOUBLE.unpack_from


def quick_decode(data):
    """
    Decode the common small values of a call (a list of, or one: small int,
    float, None, bool, short str) without the general reader.

    @param data: the whole encoding (C{bytes}).
    @return: the value, or L{MISS} for anything else, including every
        invalid input (the general path of
        L{tvm_rpc.protocol.values.decode} then decodes or rejects it).
    """
    try:
        if data[0] != VERSION:
            return MISS
        end = len(data)
        tag = data[1]
        if tag == TAG_LIST:
            count = data[2]
            if count >= 0x80:
                return MISS
            position = 3
            items = []
            append = items.append
            for _ in range(count):
                tag = data[position]
                if tag == TAG_INT:
                    number = data[position + 1]
                    if number < 0x80:
                        position += 2
                    else:
                        high = data[position + 2]
                        if high >= 0x80:
                            return MISS
                        number = (number & 0x7F) | (high << 7)
                        position += 3
                    append(number >> 1 if not number & 1 else -((number + 1) >> 1))
                elif tag == TAG_FLOAT:
                    if position + 9 > end:
                        return MISS
                    append(_unpack_double(data, position + 1)[0])
                    position += 9
                elif tag == TAG_STR:
                    length = data[position + 1]
                    start = position + 2
                    position = start + length
                    if length >= 0x80 or position > end:
                        return MISS
                    append(str(data[start:position], "utf-8"))
                elif tag == TAG_NONE:
                    append(None)
                    position += 1
                elif tag == TAG_TRUE:
                    append(True)
                    position += 1
                elif tag == TAG_FALSE:
                    append(False)
                    position += 1
                else:
                    return MISS
            return items if position == end else MISS
        if tag == TAG_INT:
            number = data[2]
            if end == 3 and number < 0x80:
                return number >> 1 if not number & 1 else -((number + 1) >> 1)
            if end == 4 and number >= 0x80 and data[3] < 0x80:
                number = (number & 0x7F) | (data[3] << 7)
                return number >> 1 if not number & 1 else -((number + 1) >> 1)
            return MISS
        if tag == TAG_FLOAT:
            return _unpack_double(data, 2)[0] if end == 10 else MISS
        if end == 2 and tag in SINGLETONS:
            return SINGLETONS[tag]
        return MISS
    except (IndexError, UnicodeDecodeError):
        return MISS

"""
Bulk data on TVM's servers: uploads, downloads and array copies.

TVM's server buffers a whole packet, and its C{upload}/C{download} are
single calls, so files travel whole (bounded by the session's
C{max_result_size} on the way back). Array copies are chunked: each chunk is
one kCopyToRemote / kCopyFromRemote of a one-dimensional view of the array
at a byte offset, at most C{chunk_size} bytes and, when the server defines
C{tvm.rpc.server.GetCRTMaxPacketSize} (microTVM-style devices), within its
packet limit; that limit is asked once per session. At most C{window} chunks
are in flight, so memory stays bounded on both ends.
"""

import os

import attrs
from twisted.internet.defer import Deferred, fail, succeed

from ..localfiles import replacing
from ..protocol import tvm_packets as packets
from ..protocol.remote_error import RemoteError
from .tvm_protocol import NO_SUCH_FUNCTION


class TVMTransfers:
    """
    The transfer verbs of L{TVMEngine<tvm_rpc.client.tvm_engine.TVMEngine>}.

    A mixin: the class using it provides C{chunk_size}, C{window},
    C{max_result_size}, C{_max_packet} (L{None} until asked, the list of
    Deferreds waiting while it is asked, then the limit or 0 for none),
    C{_request(data, copy_ack)}, C{_call_by_name(name, wire, convert)},
    C{_queue_free(code, *args)} and C{_entry(handle, kind)} with C{_Array}
    entries (C{desc}).
    """

    __slots__ = ()

    def upload(self, data, target):
        """Upload a local file or bytes with C{tvm.rpc.server.upload} (one call)."""
        try:
            if isinstance(data, (str, os.PathLike)):
                path = os.fspath(data)
                if target is None:
                    target = os.path.basename(path)
                with open(path, "rb") as source:
                    blob = source.read()
            elif target is None:
                raise ValueError("upload of bytes needs a target path")
            else:
                blob = bytes(memoryview(data).cast("B"))
        except (OSError, ValueError, TypeError):
            return fail()
        return self._call_by_name("tvm.rpc.server.upload", [target, blob],
                                  lambda _: len(blob))

    def download(self, path, local_path):
        """
        Download a file with C{tvm.rpc.server.download}.

        @return: a Deferred of its bytes, or of the number of bytes written
            to C{local_path} (through a temporary file beside it).
        """
        downloading = self._call_by_name("tvm.rpc.server.download", [path], lambda blob: blob)
        if local_path is None:
            return downloading
        return downloading.addCallback(_write_file, os.path.abspath(os.fspath(local_path)))

    # -- arrays ------------------------------------------------------------

    def _packet_limit(self):
        """
        @return: a Deferred of the server's packet limit, or L{None} when it
            has none; asked once per session (TVM's client asks before every
            copy), copies that start meanwhile waiting for that one answer.
        """
        known = self._max_packet
        if isinstance(known, int):
            return succeed(known or None)
        waiter = Deferred()
        if known is not None:
            known.append(waiter)
            return waiter
        self._max_packet = [waiter]

        def settle(limit):
            waiters, self._max_packet = self._max_packet, limit
            for each in waiters:
                if not each.called:
                    each.callback(limit or None)

        def asked(limit):
            settle(limit if isinstance(limit, int) and limit > 0 else 0)

        def missing(failure):
            if failure.check(RemoteError) and failure.value.type_name == NO_SUCH_FUNCTION:
                settle(0)
                return
            waiters, self._max_packet = self._max_packet, None
            for each in waiters:
                if not each.called:
                    each.errback(failure)

        self._call_by_name("tvm.rpc.server.GetCRTMaxPacketSize", [],
                           lambda limit: limit).addCallbacks(asked, missing)
        return waiter

    async def _chunks(self, handle):
        """@return: C{(desc, [(offset, length), ...])} of an array's copy chunks."""
        desc = self._entry(handle, self._array_entry).desc
        itemsize = desc.dtype.itemsize
        # A read chunk comes back in one packet: within the answer bound too.
        chunk = min(self.chunk_size, self.max_result_size)
        limit = await self._packet_limit()
        if limit is not None:
            chunk = min(chunk, limit - packets.COPY_OVERHEAD - 8)
        chunk = max(itemsize, chunk - chunk % itemsize)
        total = desc.nbytes
        return desc, [(offset, min(chunk, total - offset)) for offset in range(0, total, chunk)]

    @staticmethod
    def _view(desc, offset, length):
        """The descriptor of C{length} bytes of C{desc} at C{offset} (one dimension)."""
        return attrs.evolve(desc, shape=(length // desc.dtype.itemsize,), byte_offset=offset)

    def write_array(self, handle, data, what):
        """Overwrite an array with raw C-order bytes, chunked (kCopyToRemote)."""
        return Deferred.fromCoroutine(self._write_array(handle, data, what))

    async def _write_array(self, handle, data, what):
        desc, chunks = await self._chunks(handle)
        view = memoryview(data).cast("B")
        if len(view) != desc.nbytes:
            raise ValueError(f"{what!r} holds {desc.nbytes} bytes, not {len(view)}")
        await self._windowed(
            chunks, lambda offset, length: self._request(packets.copy_to_remote(
                self._view(desc, offset, length), view[offset:offset + length])))

    def read_array(self, handle):
        """@return: a Deferred of the raw C-order bytes of an array, chunked (kCopyFromRemote)."""
        return Deferred.fromCoroutine(self._read_array(handle))

    async def _read_array(self, handle):
        desc, chunks = await self._chunks(handle)
        parts = await self._windowed(
            chunks, lambda offset, length: self._request(
                packets.copy_from_remote(self._view(desc, offset, length), length),
                copy_ack=length))
        return b"".join(parts)

    async def _windowed(self, chunks, send):
        """
        Send one request per chunk with at most C{window} in flight.

        @return: the answers, in order.
        """
        answers = []
        in_flight = []
        try:
            for offset, length in chunks:
                in_flight.append(send(offset, length))
                if len(in_flight) >= max(1, self.window):
                    answers.append(await in_flight.pop(0))
            while in_flight:
                answers.append(await in_flight.pop(0))
        except BaseException:
            for sending in in_flight:
                sending.addErrback(lambda _: None)
            raise
        return answers


def _write_file(blob, local_path):
    """Write C{blob} to C{local_path} through a temporary file; @return: its length."""
    with replacing(local_path) as sink:
        sink.write(blob)
    return len(blob)


__all__ = ["TVMTransfers"]

"""
Bulk data over our session's streams: uploads, downloads and array copies.

Data moves in chunks of at most C{chunk_size} bytes with at most C{window}
chunks in flight per transfer, whatever the total size; cancelling the
Deferred of a transfer stops it and closes the stream on the server (a
partial upload is deleted there).
"""

import os

from twisted.internet.defer import Deferred

from ..localfiles import replacing
from ..protocol.session_commands import OpenArrayRead, OpenArrayWrite, OpenDownload, OpenUpload
from ..protocol.streams import chunked, file_chunks, read_stream, write_stream


class StreamTransfers:
    """
    The transfer verbs of L{AMPEngine<tvm_rpc.client.amp_engine.AMPEngine>}.

    A mixin: the class using it provides C{chunk_size}, C{window},
    C{_call_remote(command, **kwargs)}, C{_guarded(command, orphan, **kwargs)}
    and C{_close_stream(stream)}.
    """

    __slots__ = ()

    def upload(self, data, target):
        """
        Send a local file (read as it is sent) or bytes to C{target} on the
        server, in chunks (see
        L{ISessionEngine.upload<tvm_rpc.client.engine.ISessionEngine.upload>}).
        """
        return Deferred.fromCoroutine(self._upload(data, target))

    async def _upload(self, data, target):
        if isinstance(data, (str, os.PathLike)):
            path = os.fspath(data)
            if target is None:
                target = os.path.basename(path)
            with open(path, "rb") as source:
                size = os.fstat(source.fileno()).st_size
                return await self._send_file(target, file_chunks(source, self.chunk_size), size)
        if target is None:
            raise ValueError("upload of bytes needs a target path")
        view = memoryview(data).cast("B")
        return await self._send_file(target, chunked(view, self.chunk_size), len(view))

    async def _send_file(self, target, chunks, size):
        answer = await self._guarded(
            OpenUpload, lambda answer: self._close_stream(answer["stream"]),
            path=target, size=size,
        )
        return await write_stream(self._call_remote, answer["stream"], chunks,
                                  window=self.window)

    def download(self, path, local_path):
        """
        Download a file of the session's work directory, in chunks.

        @param local_path: when not L{None}, the data is written there as it
            arrives (through a temporary file beside it, renamed at the end).
        @return: a Deferred of the file's bytes, or of the number of bytes
            written to C{local_path}.
        """
        return Deferred.fromCoroutine(self._download(path, local_path))

    async def _download(self, path, local_path):
        answer = await self._guarded(
            OpenDownload, lambda answer: self._close_stream(answer["stream"]), path=path)
        stream, size = answer["stream"], answer["size"]
        if local_path is None:
            parts = []
            await read_stream(self._call_remote, stream, size, parts.append,
                              window=self.window, chunk_size=self.chunk_size)
            return b"".join(parts)
        with replacing(os.path.abspath(os.fspath(local_path))) as sink:
            return await read_stream(
                self._call_remote, stream, size, sink.write,
                window=self.window, chunk_size=self.chunk_size,
            )

    def write_array(self, handle, data, what):
        """
        Overwrite the array C{handle} with C{data} (raw C-order bytes).

        @param what: the array, for the error message.
        @return: a Deferred firing once the data is on the device.
        """
        return Deferred.fromCoroutine(self._write_array(handle, data, what))

    async def _write_array(self, handle, data, what):
        answer = await self._guarded(
            OpenArrayWrite, lambda answer: self._close_stream(answer["stream"]), array=handle)
        if answer["size"] != len(data):
            self._close_stream(answer["stream"])
            raise ValueError(
                f"the server expects {answer['size']} bytes for {what!r}, not {len(data)}")
        await write_stream(self._call_remote, answer["stream"],
                           chunked(data, self.chunk_size), window=self.window)

    def read_array(self, handle):
        """@return: a Deferred of the raw bytes of the array C{handle}."""
        return Deferred.fromCoroutine(self._read_array(handle))

    async def _read_array(self, handle):
        answer = await self._guarded(
            OpenArrayRead, lambda answer: self._close_stream(answer["stream"]), array=handle)
        parts = []
        await read_stream(self._call_remote, answer["stream"], answer["size"], parts.append,
                          window=self.window, chunk_size=self.chunk_size)
        return b"".join(parts)


__all__ = ["StreamTransfers"]

"""A session's work directory: its making, the confinement of paths to it, its files.

Every session gets a fresh L{WorkDirectory} under the server's work
root, removed when the session ends. Every path a client names is confined
to it: absolute paths, C{..} components and symlinks that lead out are
refused with L{PathEscapeError<tvm_rpc.server.errors.PathEscapeError>} (a
L{PermissionError}) naming the path. A worker that died without
cleaning up leaves directories that L{remove_work_dirs_of} removes.

Streamed uploads and downloads go through the sink and source here:
L{FileSink} writes a file atomically (beside its final path, renamed
over it at the end), L{FileSource} serves a file by offset. Both are
given paths already confined by the caller.
"""

import os
import re
import shutil
import sys
import tempfile

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from ..localfiles import open_temporary
from ..protocol.stream_table import ISink, ISource
from ..protocol.streams import StreamError
from .errors import PathEscapeError

log = Logger()

_SEPARATORS = re.compile(r"[\\/]+")


@attrs.define(eq=False)
class WorkDirectory:
    """
    A session's work directory and the confinement of paths to it.

    @ivar root: the directory, as a canonical absolute path.
    """

    root: str = attrs.field(converter=os.path.realpath)

    @classmethod
    def create(cls, parent=None):
        """
        Make a fresh, private directory.

        @param parent: the directory to create it in (made if missing); the
            system's temporary directory when L{None}.
        @return: a L{WorkDirectory}.
        """
        if parent is not None:
            os.makedirs(parent, exist_ok=True)
        # The pid in the name lets the server remove what a worker that died
        # (crash, timeout kill) could not: see remove_work_dirs_of.
        return cls(tempfile.mkdtemp(prefix=f"session-{os.getpid()}-", dir=parent))

    def resolve(self, path):
        """
        Confine a client's path to the work directory.

        @param path: a relative path (C{""} and C{"."} name the directory).
        @return: the canonical absolute path inside the work directory.
        @raise PathEscapeError: for an absolute path, a C{..} component, a NUL
            byte, or a path that leads out through a symlink.
        @raise TypeError: when C{path} is not a string.
        """
        if not isinstance(path, str):
            raise TypeError(f"paths are strings, not {type(path).__name__}")
        if "\x00" in path:
            raise PathEscapeError(f"refused path {path!r}: it contains a NUL byte")
        if os.path.isabs(path) or path[:1] in ("/", "\\") or os.path.splitdrive(path)[0]:
            raise PathEscapeError(
                f"refused path {path!r}: absolute paths are not allowed; "
                "paths are relative to the session's work directory"
            )
        if ".." in _SEPARATORS.split(path):
            raise PathEscapeError(f"refused path {path!r}: '..' is not allowed")
        real = os.path.realpath(os.path.join(self.root, path))
        if real != self.root and not real.startswith(self.root + os.sep):
            raise PathEscapeError(
                f"refused path {path!r}: it leads out of the work directory (symlink)"
            )
        return real

    def file_target(self, path):
        """
        @return: the confined path of a file to write, its parent directories made.
        @raise IsADirectoryError: for the work directory itself.
        @raise PathEscapeError: as L{resolve}.
        """
        target = self.resolve(path)
        if target == self.root:
            raise IsADirectoryError(f"{path!r} is the work directory, not a file")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        return target

    def existing_file(self, path):
        """
        @return: the confined path of the existing file C{path}.
        @raise FileNotFoundError: saying there is no such file in the work
            directory (in the client's terms, never the server's paths).
        @raise PathEscapeError: as L{resolve}.
        """
        target = self.resolve(path)
        if not os.path.isfile(target):
            raise FileNotFoundError(f"no file {path!r} in the work directory")
        return target

    def read(self, path):
        """@return: the bytes of the file C{path}."""
        with open(self.existing_file(path), "rb") as f:
            return f.read()

    def delete(self, path):
        """
        Delete the file or directory tree C{path}.

        @raise PathEscapeError: for the work directory itself (see L{remove}).
        """
        target = self.resolve(path)
        if target == self.root:
            raise PathEscapeError(f"refused to remove the work directory itself ({path!r})")
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        else:
            os.unlink(target)

    def listdir(self, path="."):
        """@return: the sorted names in the directory C{path}."""
        return sorted(os.listdir(self.resolve(path)))

    def remove(self):
        """Delete the directory and everything in it (errors are logged)."""

        if not os.path.isdir(self.root):
            return

        def failed(function, path, error):
            """Log a file that could not be removed."""
            log.warn("could not remove {path}: {error}", path=path, error=error)

        if sys.version_info >= (3, 12):
            shutil.rmtree(self.root, onexc=failed)
        else:
            shutil.rmtree(self.root, onerror=lambda function, path, info: failed(function, path, info[1]))


def remove_work_dirs_of(work_root, pid):
    """
    Remove the work directories that the process C{pid} created under
    C{work_root} (for a session worker that died without cleaning up).

    @return: the number of directories removed.
    """
    prefix = f"session-{int(pid)}-"
    removed = 0
    try:
        names = os.listdir(work_root)
    except FileNotFoundError:
        return 0
    for name in names:
        path = os.path.join(work_root, name)
        if name.startswith(prefix) and os.path.isdir(path) and not os.path.islink(path):
            WorkDirectory(path).remove()
            removed += 1
    return removed


@implementer(ISink)
@attrs.define(eq=False)
class FileSink:
    """
    Write a stream to a file, atomically: chunks go to a hidden temporary
    file beside C{path} (see L{open_temporary}), renamed over C{path} at
    L{finish}; a cancelled stream leaves nothing behind.

    @ivar path: the final path (already confined by the caller).
    @ivar expected: when not L{None}, the exact size required at L{finish}.
    @ivar charge: when not L{None}, called with C{(nbytes, path)} before
        each chunk is written; it raises to refuse the chunk (a quota).
    """

    path: str
    expected: "int | None" = None
    charge: object = None
    _file: object = None
    _temporary: str = ""
    _size: int = 0

    def __attrs_post_init__(self):
        """Open the temporary file."""
        self._temporary, self._file = open_temporary(self.path)

    def write(self, data):
        """Write C{data} to the temporary file."""
        if self.expected is not None and self._size + len(data) > self.expected:
            raise StreamError(f"upload exceeds its announced {self.expected} bytes")
        if self.charge is not None:
            self.charge(len(data), self.path)
        self._file.write(data)
        self._size += len(data)

    def finish(self):
        """Move the file into place. @return: its size."""
        if self.expected is not None and self._size != self.expected:
            self.cancel()
            raise StreamError(f"upload ended after {self._size} of {self.expected} bytes")
        self._file.close()
        os.replace(self._temporary, self.path)
        return self._size

    def cancel(self):
        """Delete the temporary file."""
        if not self._file.closed:
            self._file.close()
        try:
            os.unlink(self._temporary)
        except FileNotFoundError:
            pass


@implementer(ISource)
@attrs.define(eq=False)
class FileSource:
    """Serve chunks of a file by offset (opened at once, so the size is fixed)."""

    path: str
    _descriptor: int = -1
    size: int = 0

    def __attrs_post_init__(self):
        """Open the file and note its size."""
        self._descriptor = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.size = os.fstat(self._descriptor).st_size

    def read(self, offset, length):
        """@return: up to C{length} bytes at C{offset}."""
        if self._descriptor < 0:
            raise StreamError("stream closed")
        if hasattr(os, "pread"):
            return os.pread(self._descriptor, length, offset)
        os.lseek(self._descriptor, offset, os.SEEK_SET)
        return os.read(self._descriptor, length)

    def close(self):
        """Close the file."""
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1

"""Local file helpers shared by both ends of a session (no protocol, no reactor).

A file received over a session is written beside its final path under a
temporary name and renamed over it once complete, so a reader never sees
half a file and a cancelled transfer leaves nothing behind: the client does
this for downloads, the server (:class:`~tvm_rpc.server.workdir.FileSink`)
for uploads. :func:`open_temporary` makes that temporary file;
:func:`replacing` writes a whole file that way.
"""

import contextlib
import itertools
import os

#: Ids that make temporary names unique within this process.
_temporary_ids = itertools.count(1)


def open_temporary(path):
    """
    Create a hidden temporary file beside C{path}, to be renamed over it.

    The name is short and does not contain C{path}'s own name, so any name
    the file system accepts (up to C{NAME_MAX}, 255 bytes) can be written
    this way; it is created exclusively, so it never clobbers a file.

    @param path: the final path.
    @return: C{(temporary path, file open for binary writing)}.
    @raise OSError: when no file can be created there.
    """
    directory = os.path.dirname(path)
    for _ in range(100):
        temporary = os.path.join(directory, f".part-{os.getpid()}-{next(_temporary_ids)}")
        try:
            return temporary, open(temporary, "xb")
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path!r}")


@contextlib.contextmanager
def replacing(path):
    """
    Write a file through a temporary file beside it: C{with replacing(path)
    as sink: sink.write(...)} renames it over C{path} when the block ends
    well, and deletes it when the block raises (cancellation included).

    @param path: the final path.
    @return: a context manager giving the file open for binary writing.
    """
    temporary, sink = open_temporary(path)
    try:
        with sink:
            yield sink
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise

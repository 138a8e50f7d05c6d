"""The settings and limits of one session, chosen by the server's operator.

L{SessionSettings} holds every per-session setting of
C{twistd rpc-server} (box size, open streams, work directory bytes, remote
tracebacks, code upload). It travels as one value from the command line to
the session: C{tap.py} builds it, the fork server receives it as one JSON
argument (L{SessionSettings.to_json} / L{SessionSettings.from_json})
and the session factory gets it as C{settings=}; a new setting is a new
field here, not a new flag in every layer.

L{WorkDirQuota} bounds the bytes a session writes into its work
directory. It measures the directory when an upload starts (so files that
were removed, replaced or written by session code are seen as they are)
and counts every byte written by uploads from then on, so concurrent
uploads share one budget. Between two measurements the count can only
overestimate what is on disk, never underestimate it.
"""

import errno
import json
import os
import re

import attrs

from ..protocol.session_commands import CHUNK_SIZE

#: Default largest AMP box a session accepts (a stream chunk is 512 KiB).
DEFAULT_MAX_BOX_BYTES = 1 << 20
#: The smallest box limit that still carries a full stream chunk.
MIN_MAX_BOX_BYTES = CHUNK_SIZE + 64 * 1024
#: Default most streams open at once in one session (each upload holds a file).
DEFAULT_MAX_STREAMS = 256
#: Default most bytes uploads may put in one session's work directory (4 GiB).
DEFAULT_MAX_WORK_DIR_BYTES = 4 << 30


class WorkDirFull(OSError):
    """An upload that would take the work directory past its byte limit."""

    def __init__(self, message):
        """@param message: what was refused and why."""
        super().__init__(errno.ENOSPC, message)

    def __str__(self):
        """@return: the message alone (no errno prefix: it crosses the wire)."""
        return self.strerror


def _positive(instance, attribute, value):
    """An attrs validator: C{value} must be an int above 0 (not a bool)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, not {value!r}")


def _flag(instance, attribute, value):
    """An attrs validator: C{value} must be a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{attribute.name} must be true or false, not {value!r}")


def _positive_or_none(instance, attribute, value):
    """An attrs validator: C{value} must be L{None} or a number above 0."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not value > 0):
        raise ValueError(f"{attribute.name} must be a positive number of seconds, not {value!r}")


def _at_least_one_chunk(instance, attribute, value):
    """An attrs validator: a box limit must carry a whole stream chunk."""
    _positive(instance, attribute, value)
    if value < MIN_MAX_BOX_BYTES:
        raise ValueError(
            f"{attribute.name} must be at least {MIN_MAX_BOX_BYTES} bytes "
            f"(a stream chunk is {CHUNK_SIZE} bytes), not {value}"
        )


@attrs.frozen
class SessionSettings:
    """
    The operator's settings for every session of a server.

    @ivar max_box_bytes: the largest AMP box a session accepts; a peer that
        sends a longer one (finished or not) is told so and disconnected.
    @ivar max_streams: the most streams (uploads, downloads, array copies,
        long values and results) open at once; opening one more fails.
    @ivar max_work_dir_bytes: the most bytes uploads may put in the work
        directory; an upload that would pass it fails (L{WorkDirFull}).
    @ivar send_tracebacks: whether remote errors carry the server's
        traceback (they always carry the type name and message).
    @ivar code_upload: whether modules uploaded in the session (C{.py},
        C{.so}, C{.tar}, ...) may be loaded; when L{False}, only functions
        from C{--init} modules and the registry run.
    @ivar idle_timeout: seconds a session of our protocol may stay without
        a message from its client once its last answer left (L{None}: no
        limit, a user at a notebook may think for an hour).
    """

    max_box_bytes: int = attrs.field(default=DEFAULT_MAX_BOX_BYTES,
                                     validator=_at_least_one_chunk)
    max_streams: int = attrs.field(default=DEFAULT_MAX_STREAMS, validator=_positive)
    max_work_dir_bytes: int = attrs.field(default=DEFAULT_MAX_WORK_DIR_BYTES,
                                          validator=_positive)
    send_tracebacks: bool = attrs.field(default=False, validator=_flag)
    code_upload: bool = attrs.field(default=True, validator=_flag)
    idle_timeout: "float | None" = attrs.field(default=None, validator=_positive_or_none)

    def to_json(self):
        """@return: the settings as one line of JSON (for the fork server's command line)."""
        return json.dumps(attrs.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text):
        """
        @param text: what L{to_json} made.
        @return: the settings.
        @raise ValueError: for text that is not such an object, an unknown
            setting or a bad value.
        """
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError(f"session settings must be a JSON object, not {text!r}")
        known = set(attrs.fields_dict(cls))
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown session settings: {', '.join(unknown)}")
        return cls(**fields)


_BYTE_COUNT = re.compile(r"^(\d+)\s*([KMGT]?)(?:(?<=[KMGT])I?B|B)?$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text):
    """
    Read a byte count from the command line: digits, optionally followed by
    C{K}, C{M}, C{G} or C{T} (powers of 1024, an optional C{iB} or C{B}
    after them), e.g. C{1048576}, C{512K}, C{4GiB}.

    @return: the number of bytes.
    @raise ValueError: for anything else.
    """
    match = _BYTE_COUNT.match(str(text).strip().upper())
    if match is None:
        raise ValueError(f"{text!r} is not a byte count (e.g. 1048576, 512K, 4GiB)")
    digits, unit = match.group(1), match.group(2)
    return int(digits) * _UNITS[unit]


def directory_bytes(root):
    """
    @param root: a directory.
    @return: the total size of the regular files under it (symlinks are not
        followed; entries that vanish while counting are skipped).
    """
    total = 0
    pending = [root]
    while pending:
        try:
            entries = os.scandir(pending.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    return total


@attrs.define(eq=False)
class WorkDirQuota:
    """
    The byte budget of a session's work directory; see the module docstring.

    @ivar root: the work directory.
    @ivar limit: the most bytes, or L{None} for no limit.
    @ivar used: the bytes counted so far.
    """

    root: str
    limit: "int | None" = None
    used: int = 0

    def measure(self):
        """Count what the work directory holds now (when an upload starts)."""
        if self.limit is not None:
            self.used = directory_bytes(self.root)

    def charge(self, nbytes, path):
        """
        Count C{nbytes} more written to C{path}.

        @raise WorkDirFull: when they would pass the limit (nothing is counted then).
        """
        if self.limit is None:
            return
        if self.used + nbytes > self.limit:
            raise WorkDirFull(
                f"cannot write {path!r}: the session's work directory would exceed its "
                f"limit of {self.limit} bytes ({self.used} used, {nbytes} more asked; "
                "the server's --max-work-dir-bytes)"
            )
        self.used += nbytes

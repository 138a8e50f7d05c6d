"""The control messages between the server and its fork server, with a socket each.

The server hands a session to the fork server, and the fork server hands it
on to a spare worker, as one control message over a Unix socket: a JSON
header (the handshake reply, early bytes, metadata), length-prefixed, with
the session's file descriptor attached (C{SCM_RIGHTS}).
L{send_control} writes one; L{receive_control} reads one, blocking.
L{site_flags} gives the interpreter flags both sides start their child
Pythons with.
"""

import json
import os
import socket
import struct
import sys

_LENGTH = struct.Struct("<I")
#: The largest control message (handshake reply, early bytes, metadata).
MAX_CONTROL_MESSAGE = 1 << 20


def send_control(sock, header, fd):
    """
    Send one control message, with a file descriptor or without.

    @param sock: a blocking Unix socket (the server's end of the control
        socket, or either end of a worker's channel to the fork server).
    @param header: a JSON-able L{dict}.
    @param fd: the descriptor to pass, or L{None}.
    """
    body = json.dumps(header).encode("utf-8")
    if len(body) > MAX_CONTROL_MESSAGE:
        raise ValueError("control message too large")
    data = _LENGTH.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], [] if fd is None else [fd])
    if sent < len(data):
        sock.sendall(data[sent:])


def receive_control(sock):
    """
    Wait for one control message.

    It reads exactly one message's bytes, never into the next: a descriptor
    arrives with the first byte of its message, so a read that ran on would
    take the next message's descriptor with this one's header (a retirement
    followed at once by a session would lose the session).

    @return: C{(header, fd)} (C{fd} is L{None} for a message without
        one), or C{(None, None)} when the other end went away.
    """
    fds = []
    try:
        prefix = _receive_exactly(sock, _LENGTH.size, fds)
        if prefix is None:
            return None, None
        (length,) = _LENGTH.unpack(prefix)
        if length > MAX_CONTROL_MESSAGE:
            raise ValueError("control message too large")
        body = _receive_exactly(sock, length, fds)
        if body is None:
            return None, None
        header = json.loads(body.decode("utf-8"))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for extra in fds[1:]:
        os.close(extra)
    return header, (fds[0] if fds else None)


def _receive_exactly(sock, size, fds):
    """
    @return: C{size} bytes from C{sock} (descriptors that came with them
        appended to C{fds}), or L{None} when it ended first.
    """
    data = b""
    while len(data) < size:
        chunk, received, _, _ = socket.recv_fds(sock, size - len(data), 1)
        fds.extend(received)
        if not chunk:
            for fd in fds:
                os.close(fd)
            del fds[:]
            return None
        data += chunk
    return data


def site_flags(flags=sys.flags):
    """
    The flags of this interpreter that decide where a child Python finds
    modules (C{-S}, C{-s}, C{-P}; C{-I} sets the last two), so the fork server
    sees the modules the server sees: a server run as C{python -I -S
    tvm-rpc-server.pyz} must not have workers that import from site-packages
    or the working directory. C{-E} is not passed on: the fork server finds
    tvm_rpc through C{PYTHONPATH} (the device bundle puts its zip there).

    @param flags: the flags to translate (C{sys.flags}).
    @return: a tuple of command-line flags.
    """
    wanted = [("no_site", "-S"), ("no_user_site", "-s"), ("safe_path", "-P")]
    return tuple(flag for name, flag in wanted if getattr(flags, name, False))

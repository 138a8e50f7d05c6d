"""The control messages between the server and its fork server, with a socket each.

The server hands a session to the fork server, and the fork server hands it
on to a spare worker, as one control message over a Unix socket: a JSON
header (the handshake reply, early bytes, metadata), length-prefixed, with
the session's file descriptor attached (C{SCM_RIGHTS}).
L{send_control} writes one; L{receive_control} reads one, blocking.
"""

import json
import socket
import struct

_LENGTH = struct.Struct("<I")
#: The largest control message (handshake reply, early bytes, metadata).
MAX_CONTROL_MESSAGE = 1 << 20


def send_control(sock, header, fd):
    """
    Send one control message with a file descriptor.

    @param sock: a blocking Unix socket (the server's end of the control
        socket, or the fork server's end of a spare's).
    @param header: a JSON-able L{dict}.
    @param fd: the descriptor to pass.
    """
    body = json.dumps(header).encode("utf-8")
    if len(body) > MAX_CONTROL_MESSAGE:
        raise ValueError("control message too large")
    data = _LENGTH.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], [fd])
    if sent < len(data):
        sock.sendall(data[sent:])


def receive_control(sock):
    """
    Wait for one control message.

    @return: C{(header, fd)}, or C{(None, None)} when the server went away.
    """
    data, fds, _, _ = socket.recv_fds(sock, 65536, 1)
    if not data:
        return None, None
    while len(data) < _LENGTH.size:
        more = sock.recv(65536)
        if not more:
            return None, None
        data += more
    (length,) = _LENGTH.unpack_from(data)
    if length > MAX_CONTROL_MESSAGE:
        raise ValueError("control message too large")
    while len(data) < _LENGTH.size + length:
        more = sock.recv(65536)
        if not more:
            return None, None
        data += more
    header = json.loads(data[_LENGTH.size : _LENGTH.size + length].decode("utf-8"))
    return header, (fds[0] if fds else None)

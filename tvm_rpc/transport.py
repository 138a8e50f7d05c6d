"""Transport plumbing that every role shares: socket options, peer names, endpoints, carriers.

This module is on the ground floor beside L{tvm_rpc.protocol} (which does no
I/O): the tracker, the proxy, the server and the client all import it, and it
imports none of them.

  - Socket options: L{set_no_delay} (Nagle off through the transport's public
    switch), L{tune_tcp} (Nagle off and TCP keepalive with L{KeepAlive}
    timers), L{quick_ack} (acknowledge a partial frame at once). Transports
    that are not TCP (UNIX sockets, websockets, test transports) are left
    alone. L{tcp_byte_counts} reads what a connection moved from the kernel.
  - Peer names: L{peer_label} (C{host:port} text for log lines) and
    L{peer_host_port} (the C{(host, port)} a tracker counts and reports).
  - L{client_endpoint}: reach C{host:port} by address or by name.
  - L{SwitchingCarrier}: the protocol that does one side of the RPC handshake
    and then carries a session protocol over the same transport.
  - L{quiet_factory}: a factory for one protocol instance that logs no
    "Starting factory" lines (our factory classes say C{noisy = False} too):
    an operator reads our lines, not Twisted's.
  - L{PEER_HANDSHAKE_TIMEOUT}: how long a server or proxy port waits for a
    connecting peer's handshake (the timers are L{TimeoutMixin}s on the
    handshake protocols).
"""

import ipaddress
import socket
import struct

import attrs
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

log = Logger("tvm_rpc.transport")

#: Seconds a peer connecting to a server port or a proxy port has to send
#: its handshake before it is dropped.
PEER_HANDSHAKE_TIMEOUT = 10.0


@attrs.frozen
class KeepAlive:
    """
    Per-socket TCP keepalive timers, so a dead peer is noticed in about
    C{idle + interval * count} seconds.

    @ivar idle: seconds of silence before the first probe.
    @ivar interval: seconds between probes.
    @ivar count: unanswered probes before the kernel drops the connection.
    """

    idle: int = 30
    interval: int = 10
    count: int = 3


# Socket options


def tcp_socket_of(transport):
    """
    @return: the TCP socket under C{transport} (looking through wrappers such
        as TLS), or L{None} when there is none (UNIX sockets, websockets,
        in-memory transports).
    """
    for _ in range(4):
        if transport is None:
            return None
        get_handle = getattr(transport, "getHandle", None)
        if get_handle is not None:
            try:
                handle = get_handle()
            except Exception:
                handle = None
            if isinstance(handle, socket.socket):
                if handle.type == socket.SOCK_STREAM and handle.family in (
                    socket.AF_INET, socket.AF_INET6
                ):
                    return handle
                return None
        transport = getattr(transport, "transport", None)
    return None


def set_no_delay(transport):
    """
    Switch Nagle off on C{transport}: handshakes, tracker commands and
    sessions are request/response, so every delayed small write is latency.
    Streams that are not TCP (UNIX sockets, test transports) are left alone.
    """
    no_delay = getattr(transport, "setTcpNoDelay", None)
    if no_delay is not None:
        try:
            no_delay(True)
        except Exception:
            # Not every stream is TCP (wrapped transports): without the
            # option the connection still works.
            pass


def tune_tcp(transport, keepalive):
    """
    Set TCP_NODELAY, and TCP keepalive with C{keepalive}'s timers, on the
    socket of C{transport} when it is a TCP socket. A socket that refuses an
    option still works: that is logged, not raised.

    @param keepalive: a L{KeepAlive}.
    @return: whether the socket was tuned.
    """
    sock = tcp_socket_of(transport)
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", keepalive.idle),
            ("TCP_KEEPINTVL", keepalive.interval),
            ("TCP_KEEPCNT", keepalive.count),
        ):
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError as e:
        log.warn("could not tune socket: {error}", error=e)
        return False
    return True


def quick_ack(transport):
    """
    Acknowledge what was received at once instead of after the delayed-ACK
    timer, on a TCP socket. TVM's clients write a frame's length and its body
    in two sends without TCP_NODELAY, so Nagle holds the body until the length
    is acknowledged: without this, every request from TVM's client waits
    about 40 ms for our delayed ACK.
    """
    option = getattr(socket, "TCP_QUICKACK", None)
    sock = tcp_socket_of(transport)
    if option is None or sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, 1)
    except OSError:
        pass


#: Where Linux's C{struct tcp_info} keeps C{tcpi_bytes_acked} and, after it,
#: C{tcpi_bytes_received} (both u64; since Linux 4.1/4.2).
_TCP_INFO_BYTES_OFFSET = 120
_TCP_INFO_BYTES = struct.Struct("=QQ")


def tcp_byte_counts(sock):
    """
    The bytes a TCP connection moved, as the kernel counted them (whichever
    process wrote or read them: a session worker shares the server's socket).

    @param sock: a L{socket.socket} of the connection.
    @return: C{(received, sent)}, sent counting what is still queued; L{None}
        where the kernel does not tell (not Linux, not TCP).
    """
    option = getattr(socket, "TCP_INFO", None)
    if option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    # Here, not at the top: clients import this module on platforms without them.
    import fcntl
    import termios

    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, 256)
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return None
    if len(info) < _TCP_INFO_BYTES_OFFSET + _TCP_INFO_BYTES.size:
        return None
    acked, received = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_BYTES_OFFSET)
    return received, acked + queued


# Peer names


def peer_label(transport, unknown="unknown peer"):
    """
    @param transport: a connected transport.
    @param unknown: the text when the transport cannot name its peer.
    @return: C{host:port} of the peer, for log lines; the address's own text
        when it has no host (a UNIX socket).
    """
    try:
        peer = transport.getPeer()
    except Exception:
        return unknown
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    if host is None:
        return str(peer)
    return f"{host}:{port}"


def peer_host_port(address):
    """
    @param address: a peer address (L{IAddress}).
    @return: C{(host, port)} of a peer address; port is L{None} for non-IP
        peers. An IPv4 peer of a dual-stack listener (C{::ffff:a.b.c.d}) is
        given as plain IPv4, the address its clients can reach it on.
    """
    host = getattr(address, "host", None)
    if host is not None:
        if host.lower().startswith("::ffff:") and host.count(".") == 3:
            host = host[len("::ffff:"):]
        return host, getattr(address, "port", None)
    name = getattr(address, "name", None)
    return (name.decode("utf-8", "replace") if isinstance(name, bytes) else (name or "localhost")), None


# Endpoints


def quiet_factory(build):
    """
    @param build: makes the protocol (called with no argument).
    @return: a L{Factory} for it that logs nothing when it starts and stops
        (Twisted's factories log both at the info level, with their repr,
        under our namespaces, so the daemons' filter cannot tell them from
        our lines).
    """
    factory = Factory.forProtocol(build)
    factory.noisy = False
    return factory


def client_endpoint(reactor, host, port, timeout):
    """
    An endpoint reaching C{host}:C{port} by address or by name.

    IP literals get a plain TCP endpoint (no resolver needed); names go through
    L{HostnameEndpoint}.

    @param timeout: seconds allowed to connect, or L{None}.
    @return: an L{IStreamClientEndpoint}.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


# Carrying a session after the handshake


class SwitchingCarrier:
    """
    Mixin for the protocol that does one side of the RPC handshake and then
    carries a session protocol over the same transport: once L{switch_to}
    ran, every byte and the connection's loss go to the session.

    The client's handshake, the server port's handshake and the server's
    link to a proxy all use it.
    """

    _session = None

    def switch_to(self, protocol, rest=b""):
        """
        Hand the connection to a session protocol.

        @param protocol: a fresh protocol; it is connected to this transport
            and given C{rest}, then every later byte.
        @param rest: bytes already received after the handshake.
        """
        self._session = protocol
        protocol.makeConnection(self.transport)
        if rest:
            protocol.dataReceived(rest)

    def carried(self, data):
        """
        Pass C{data} to the session, if one was switched to.

        @return: whether it was (then the handshake has nothing to do with it).
        """
        if self._session is None:
            return False
        self._session.dataReceived(data)
        return True

    def carry_loss(self, reason):
        """Tell the session, if any, that the connection is gone."""
        if self._session is not None:
            self._session.connectionLost(reason)

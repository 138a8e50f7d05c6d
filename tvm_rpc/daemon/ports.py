"""Listening ports that survive running out of file descriptors.

Twisted's own port logs C{EMFILE} and then either spins (the listening socket
stays readable, so the reactor calls it again at once) or, with its reserved
descriptor, accepts and closes one connection per reactor turn for as long as
descriptors stay exhausted. L{GuardedTCPPort} sheds the whole backlog with a
reserved descriptor (their clients see a prompt close rather than a hang),
stops reading for a short backoff, logs once per episode and resumes by
itself. L{GuardedListenReactor} makes endpoints build such ports.
"""

import errno
import os
import socket

from twisted.internet import address, tcp
from twisted.internet.error import CannotListenError
from twisted.internet.posixbase import PosixReactorBase

from ..twisted_fence import label_tls_port
from .logs import logger

try:
    from twisted.internet import unix
except ImportError:  # pragma: no cover - platforms without AF_UNIX
    unix = None

log = logger("tvm_rpc.daemon")

#: accept(2) errors that mean "out of descriptors or kernel memory".
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept(2) errors that concern one aborted connection only.
TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPERM, errno.EPROTO, errno.EINTR})


class _GuardedAccept:
    """
    Mixin for L{tcp.Port} subclasses: the accept loop with exhaustion handling.

    @ivar backoff: seconds the port stops accepting after running out of
        descriptors.
    @ivar max_accepts: the most connections accepted per reactor turn.
    """

    backoff = 0.25
    max_accepts = 128
    _reserve = None
    _resume_call = None
    _refused = 0
    _exhausted_since = None

    def startListening(self):
        """Listen, then reserve the descriptor used to shed the backlog."""
        super().startListening()
        self._take_reserve()

    def _take_reserve(self):
        """Hold one descriptor (on /dev/null) for L{_shed_backlog}, if one is free."""
        if self._reserve is None:
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._reserve = None

    def _release_reserve(self):
        """Give the reserved descriptor back."""
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    def doRead(self):
        """Accept the waiting connections, up to L{max_accepts} per reactor turn."""
        try:
            for _ in range(self.max_accepts):
                try:
                    skt, addr = self.socket.accept()
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                        return
                    if e.errno in TRANSIENT:
                        continue
                    if e.errno in EXHAUSTED:
                        self._exhausted(e.errno)
                        return
                    raise
                self._accepted(skt, addr)
        except Exception:
            log.failure("error accepting a connection on {port}", port=self._description())

    def _accepted(self, skt, addr):
        """Build the protocol and transport of an accepted socket."""
        if self._exhausted_since is not None:
            log.warn(
                "accepting connections on {port} again; refused {refused} while out of "
                "file descriptors",
                port=self._description(),
                refused=self._refused,
            )
            self._exhausted_since = None
            self._refused = 0
        if isinstance(addr, tuple) and len(addr) == 4:
            host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
            addr = (host[0],) + tuple(addr[1:])
        protocol = self.factory.buildProtocol(self.peer_address(addr))
        if protocol is None:
            skt.close()
            return
        session = self.sessionno
        self.sessionno = session + 1
        transport = self.transport(skt, protocol, addr, self, session, self.reactor)
        protocol.makeConnection(transport)

    def peer_address(self, addr):
        """@return: the L{IAddress} of an accepted connection's peer (C{accept}'s C{addr})."""
        raise NotImplementedError()

    def _exhausted(self, code):
        """Out of descriptors: shed the backlog, pause, log once per episode."""
        if self._exhausted_since is None:
            self._exhausted_since = self.reactor.seconds()
            log.warn(
                "out of file descriptors on {port} ({error}): refusing new connections "
                "until some close",
                port=self._description(),
                error=errno.errorcode.get(code, code),
            )
        self._shed_backlog()
        self.stopReading()
        if self._resume_call is None or not self._resume_call.active():
            self._resume_call = self.reactor.callLater(self.backoff, self._resume)

    def _shed_backlog(self):
        """Close the connections waiting in the backlog, using the reserved fd."""
        if self._reserve is None:
            return
        self._release_reserve()
        try:
            for _ in range(self.max_accepts):
                try:
                    skt, _addr = self.socket.accept()
                except OSError:
                    break
                skt.close()
                self._refused += 1
        finally:
            self._take_reserve()

    def _resume(self):
        """Accept again after the backoff (unless the port closed meanwhile)."""
        self._resume_call = None
        if self.connected and not self.disconnecting:
            self.startReading()

    def _description(self):
        """@return: the listening address, for log lines."""
        try:
            return str(self.getHost())
        except Exception:
            return repr(self)

    def connectionLost(self, reason):
        """Stop the pending resume and free the reserve as the port closes."""
        if self._resume_call is not None and self._resume_call.active():
            self._resume_call.cancel()
        self._resume_call = None
        self._release_reserve()
        super().connectionLost(reason)


class GuardedTCPPort(_GuardedAccept, tcp.Port):
    """A TCP listening port that does not spin when descriptors run out."""

    def peer_address(self, addr):
        """@return: the L{IPv4Address} or L{IPv6Address} of C{addr}, as L{tcp.Port} builds it."""
        if len(addr) == 4:
            return address.IPv6Address("TCP", *addr)
        return address.IPv4Address("TCP", *addr)


if unix is not None:

    class GuardedUNIXPort(_GuardedAccept, unix.Port):
        """A UNIX listening port that does not spin when descriptors run out."""

        def peer_address(self, addr):
            """@return: the L{UNIXAddress} of C{addr}, as L{unix.Port} builds it."""
            return address.UNIXAddress(addr)


class GuardedListenReactor:
    """
    A reactor proxy whose C{listenTCP}, C{listenSSL} and C{listenUNIX} build
    guarded ports; everything else goes to the real reactor. Pass it to
    L{twisted.internet.endpoints.serverFromString} so endpoint strings get
    guarded ports too. Reactors that are not file-descriptor based (such as
    L{twisted.internet.testing.MemoryReactor}) get the calls unchanged.
    """

    def __init__(self, reactor):
        """@param reactor: the reactor to wrap."""
        self._reactor = reactor
        self._guarded = isinstance(reactor, PosixReactorBase)

    def __getattr__(self, name):
        """Everything else is the wrapped reactor's."""
        return getattr(self._reactor, name)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        """Like L{IReactorTCP.listenTCP}, with a L{GuardedTCPPort}."""
        if not self._guarded:
            return self._reactor.listenTCP(port, factory, backlog, interface)
        p = GuardedTCPPort(port, factory, backlog, interface, self._reactor)
        p.startListening()
        return p

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        """Like L{IReactorSSL.listenSSL}: TLS over a L{GuardedTCPPort}."""
        if not self._guarded:
            return self._reactor.listenSSL(port, factory, contextFactory, backlog, interface)
        from twisted.protocols.tls import TLSMemoryBIOFactory

        p = self.listenTCP(
            port, TLSMemoryBIOFactory(contextFactory, False, factory), backlog, interface
        )
        label_tls_port(p)
        return p

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        """Like L{IReactorUNIX.listenUNIX}, with a guarded UNIX port."""
        if not self._guarded:
            return self._reactor.listenUNIX(address, factory, backlog, mode, wantPID)
        if unix is None:
            raise CannotListenError(address, None, "UNIX sockets are not supported")
        p = GuardedUNIXPort(address, factory, backlog, mode, self._reactor, wantPID)
        p.startListening()
        return p

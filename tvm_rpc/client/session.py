"""
Opening a client session on a handshaken connection.

After the RPC handshake (see L{tvm_rpc.client.connect}) the bytes of the
connection belong to the session protocol. L{start_session} performs the
opening L{Hello<tvm_rpc.protocol.session_commands.Hello>} exchange on a
L{SessionClientProtocol<tvm_rpc.client.amp_protocol.SessionClientProtocol>}
(bounded in time, so a peer that is not a tvm_rpc session server gives
L{ProtocolMismatch} instead of a hang) and returns a Deferred of an
L{RPCSession<tvm_rpc.client.rpc_session.RPCSession>} driven by an
L{AMPEngine<tvm_rpc.client.amp_engine.AMPEngine>}. L{start_tvm_session}
does the same for one of TVM's own servers (its kInitServer, then a
L{TVMEngine<tvm_rpc.client.tvm_engine.TVMEngine>}); L{open_session} first
switches a handshake carrier to the session protocol the handshake reply
announced.

Handing a connection over after the handshake (what C{connect()} does)::

    protocol = make_client_protocol()
    protocol.makeConnection(transport)   # the handshaken TCP transport
    if rest:                             # bytes that came after the reply
        protocol.dataReceived(rest)
    # from now on: dataReceived(...) and connectionLost(reason) of the
    # transport go to `protocol` (set transport.protocol, or forward them)
    session = await start_session(protocol, clock=reactor)

Bulk data (uploads, downloads, array copies) then moves in chunks of at most
the C{chunk_size} and C{window} the server's Hello announces (bounded by
L{CHUNK_SIZE<tvm_rpc.protocol.session_commands.CHUNK_SIZE>} and
L{MAX_WINDOW}). A call's result longer than C{max_result_size} (default
L{DEFAULT_MAX_RESULT_SIZE<tvm_rpc.client.engine.DEFAULT_MAX_RESULT_SIZE>})
fails with L{ResultTooLarge<tvm_rpc.protocol.streams.ResultTooLarge>} before
any of it is read, so a server cannot make the client allocate what it
announces.
"""

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectionClosed

import tvm_rpc

from ..protocol import tvm_packets
from ..protocol.flavour import OUR_PROTOCOL, TVM_PROTOCOL
from ..protocol.remote_error import RemoteError
from ..protocol.session_commands import CHUNK_SIZE, SESSION_PROTOCOL, SESSION_VERSION, Hello
from .amp_engine import AMPEngine
from .amp_protocol import make_client_protocol
from .engine import DEFAULT_MAX_RESULT_SIZE
from .rpc_session import RPCSession
from .session_errors import ProtocolMismatch, SessionLostAtStart
from .tvm_engine import TVM_CHUNK_SIZE, TVMEngine
from .tvm_protocol import PACKET_SLACK, TVMClientProtocol

#: Seconds the opening Hello may take before the peer is declared foreign.
HELLO_TIMEOUT = 10.0
#: Largest window accepted from a server (it bounds our memory per transfer).
MAX_WINDOW = 64


def start_session(protocol, *, clock=None, hello_timeout=HELLO_TIMEOUT,
                  max_result_size=DEFAULT_MAX_RESULT_SIZE, on_kept=None):
    """
    Open a session on a connected L{SessionClientProtocol}.

    @param protocol: the protocol, already given its transport.
    @param clock: the reactor (an L{IReactorTime}) that bounds the Hello and
        schedules handle releases; the global reactor when L{None}.
    @param hello_timeout: seconds the server may take to answer Hello.
    @param max_result_size: the longest encoded result of a call accepted
        (see L{RPCSession.max_result_size}).
    @param on_kept: called with C{(token, keep_for)} when the server keeps
        the session's worker for our next session (the session then asks it
        to at its end); L{None}: never ask.
    @return: a Deferred of an L{RPCSession}; it fails with
        L{SessionLostAtStart} when the connection is lost before the answer
        (the server died, or is not a session server), and with
        L{ProtocolMismatch} (the connection is then closed) when the peer
        answers something else or stays silent.
    """
    if clock is None:
        from twisted.internet import reactor as clock
    return Deferred.fromCoroutine(
        _start_session(protocol, clock, hello_timeout, max_result_size, on_kept))


async def _start_session(protocol, clock, hello_timeout, max_result_size, on_kept):
    asking = protocol.callRemote(
        Hello,
        protocol=SESSION_PROTOCOL,
        version=SESSION_VERSION,
        implementation=f"tvm_rpc-client {tvm_rpc.__version__}",
    )
    asking.addTimeout(hello_timeout, clock)
    try:
        answer = await asking
    except CancelledError:
        protocol.transport.loseConnection()
        raise
    except RemoteError as e:
        protocol.transport.loseConnection()
        raise ProtocolMismatch(f"the server refused the session: {e.message}") from e
    except ConnectionClosed as e:
        raise SessionLostAtStart(
            "the connection was lost before the answer to the tvm_rpc session "
            f"Hello ({e}): the server went away, or the peer is not a tvm_rpc "
            "session server"
        ) from e
    except TimeoutError as e:
        protocol.transport.loseConnection()
        raise ProtocolMismatch(
            f"no answer to the tvm_rpc session Hello within {hello_timeout} s: "
            "the peer is not a tvm_rpc session server (is it Apache TVM's?)"
        ) from e
    except Exception as e:
        protocol.transport.loseConnection()
        raise ProtocolMismatch(f"bad answer to the session Hello: {e}") from e
    if answer["protocol"] != SESSION_PROTOCOL or answer["version"] != SESSION_VERSION:
        protocol.transport.loseConnection()
        raise ProtocolMismatch(
            f"the server speaks {answer['protocol']!r} version {answer['version']}, "
            f"this client {SESSION_PROTOCOL!r} version {SESSION_VERSION}"
        )
    return RPCSession(
        AMPEngine(protocol, clock, on_kept=on_kept),
        chunk_size=max(1, min(answer["chunk_size"], CHUNK_SIZE)),
        window=max(1, min(answer["window"], MAX_WINDOW)),
        server_implementation=answer["implementation"],
        max_result_size=max_result_size,
    )


def start_tvm_session(protocol, *, clock=None, hello_timeout=HELLO_TIMEOUT,
                      max_result_size=DEFAULT_MAX_RESULT_SIZE):
    """
    Open a session of TVM's own protocol on a connected L{TVMClientProtocol}
    (one of TVM's servers is on the other end): kInitServer with TVM's
    protocol version and no constructor arguments, answered by kReturn.

    @return: a Deferred of an L{RPCSession} driven by a L{TVMEngine}; it
        fails as L{start_session}'s does, L{ProtocolMismatch} carrying the
        server's text when it refuses the version.
    """
    if clock is None:
        from twisted.internet import reactor as clock
    return Deferred.fromCoroutine(
        _start_tvm_session(protocol, clock, hello_timeout, max_result_size))


async def _start_tvm_session(protocol, clock, hello_timeout, max_result_size):
    asking = protocol.request(tvm_packets.init_server())
    asking.addTimeout(hello_timeout, clock)
    try:
        await asking
    except RemoteError as e:
        protocol.transport.loseConnection()
        raise ProtocolMismatch(f"TVM's server refused the session: {e.message}") from e
    except TimeoutError as e:
        protocol.transport.loseConnection()
        raise ProtocolMismatch(
            f"no answer to TVM's kInitServer within {hello_timeout} s: the peer does not "
            "speak TVM's session protocol") from e
    except ConnectionClosed as e:
        raise SessionLostAtStart(
            f"the connection was lost before TVM's server answered kInitServer ({e})") from e
    return RPCSession(
        TVMEngine(protocol, clock),
        chunk_size=TVM_CHUNK_SIZE,
        server_implementation=f"Apache TVM (session protocol {tvm_packets.PROTOCOL_VERSION})",
        max_result_size=max_result_size,
    )


def open_session(carrier, rest=b"", *, reactor=None, session_timeout=0, address=None,
                 hello_timeout=HELLO_TIMEOUT, max_result_size=DEFAULT_MAX_RESULT_SIZE,
                 protocol=OUR_PROTOCOL, on_kept=None):
    """
    Switch a handshaken connection to the session protocol and open the
    session (what L{tvm_rpc.client.connect.connect} calls).

    @param carrier: the handshake protocol; its C{switch_to(protocol, rest)}
        connects the new protocol to the transport and forwards the bytes
        and the connection's loss to it from then on.
    @param rest: bytes received after the handshake reply.
    @param reactor: as C{clock} of L{start_session}.
    @param session_timeout: the session timeout the handshake asked for
        (kept as L{RPCSession.session_timeout}, for information).
    @param address: C{host:port} of the server, for messages.
    @param max_result_size: see L{start_session}.
    @param protocol: the session protocol the handshake reply announced:
        L{OUR_PROTOCOL} (a marked reply) or L{TVM_PROTOCOL} (one of TVM's
        servers).
    @param on_kept: see L{start_session} (TVM's servers keep no worker).
    @return: a Deferred of an L{RPCSession} (see L{start_session} and
        L{start_tvm_session}).
    """
    if protocol == TVM_PROTOCOL:
        connection = TVMClientProtocol(max_result_size + PACKET_SLACK)
        carrier.switch_to(connection, rest)
        opening = start_tvm_session(connection, clock=reactor, hello_timeout=hello_timeout,
                                    max_result_size=max_result_size)
    else:
        connection = make_client_protocol()
        carrier.switch_to(connection, rest)
        opening = start_session(connection, clock=reactor, hello_timeout=hello_timeout,
                                max_result_size=max_result_size, on_kept=on_kept)

    def describe(session):
        session.address = address
        session.session_timeout = session_timeout
        return session

    return opening.addCallback(describe)


__all__ = [
    "HELLO_TIMEOUT",
    "MAX_WINDOW",
    "make_client_protocol",
    "open_session",
    "start_session",
    "start_tvm_session",
]

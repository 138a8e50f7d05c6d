"""The websocket endpoint C{/ws}: the same proxy over websocket binary messages.

TVM's web runtime (a server running in a browser) reaches the proxy over a
websocket; each binary message carries bytes of the same stream a TCP peer
would send (handshake, then session). L{ProxyWebSocketProtocol} feeds those
bytes to an ordinary L{ProxyConnection} through L{WebSocketTransport}, a shim
that turns writes into binary messages and passes producer registration and
pausing to the underlying TCP transport, so backpressure works as on the TCP
path.

Websockets have no half-close: an end of file from the TCP partner closes the
websocket once everything before it was sent. The bytes of a binary message
are relayed frame piece by frame piece as they arrive, through autobahn's
frame-level callbacks, so no message is ever held whole: a websocket pair
has the same bound as a TCP pair, whatever its messages' sizes.
"""

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger

from ..transport import PEER_HANDSHAKE_TIMEOUT
from .protocol import ProxyConnection

#: The websocket path, as TVM's proxy serves it.
WS_PATH = "/ws"


class WebSocketTransport:
    """
    What a L{ProxyConnection} needs from its transport, over a websocket.

    @ivar protocol: the L{ProxyWebSocketProtocol}.
    """

    def __init__(self, protocol):
        """@param protocol: the websocket protocol carrying the bytes."""
        self.protocol = protocol

    @property
    def _tcp(self):
        """The underlying TCP transport."""
        return self.protocol.transport

    @property
    def producer(self):
        """The streaming producer registered on the underlying transport."""
        return getattr(self._tcp, "producer", None)

    def write(self, data):
        """Send C{data} as one binary message."""
        if data and self.protocol.state == self.protocol.STATE_OPEN:
            self.protocol.sendMessage(bytes(data), isBinary=True)

    def writeSequence(self, chunks):
        """Send the chunks as one binary message."""
        self.write(b"".join(chunks))

    def loseConnection(self):
        """Close the websocket after what was sent."""
        if self.protocol.state == self.protocol.STATE_OPEN:
            self.protocol.sendClose(code=1000)
        elif self._tcp is not None:
            self._tcp.loseConnection()

    loseWriteConnection = loseConnection

    def abortConnection(self):
        """Drop the underlying connection."""
        if self._tcp is not None:
            self._tcp.abortConnection()

    def getPeer(self):
        """@return: the underlying transport's peer address."""
        return self._tcp.getPeer()

    def getHost(self):
        """@return: the underlying transport's local address."""
        return self._tcp.getHost()

    def registerProducer(self, producer, streaming):
        """Let the underlying transport pause C{producer} when its buffer is full."""
        self._tcp.registerProducer(producer, streaming)

    def unregisterProducer(self):
        """Unregister the underlying transport's producer."""
        self._tcp.unregisterProducer()

    def pauseProducing(self):
        """Stop reading websocket frames."""
        self._tcp.pauseProducing()

    def resumeProducing(self):
        """Read websocket frames again."""
        self._tcp.resumeProducing()

    def stopProducing(self):
        """Close the connection."""
        self._tcp.stopProducing()


class ProxyWebSocketProtocol(WebSocketServerProtocol):
    """A websocket peer of the proxy: binary messages in, binary messages out."""

    log = Logger()

    def __init__(self):
        """Start without a proxy connection (made on open)."""
        super().__init__()
        self.connection = None
        self._relaying = False

    def onConnect(self, request):
        """Accept only the C{/ws} path."""
        if request.path != WS_PATH:
            raise ConnectionDeny(404, f"only {WS_PATH} is served here")
        return None

    def onOpen(self):
        """Start the proxy connection (and its handshake clock)."""
        factory = self.factory
        self.connection = ProxyConnection(factory.pool, factory.clock, factory.handshake_timeout,
                                          on_relay_end=factory.on_relay_end)
        self.connection.path = "websocket"
        self.connection.makeConnection(WebSocketTransport(self))

    def onMessageBegin(self, isBinary):
        """A message starts: a binary one is relayed, a text one breaks the protocol."""
        super().onMessageBegin(isBinary)
        self._relaying = isBinary and self.connection is not None
        if self.connection is not None and not isBinary:
            self.log.warn("text message from {peer} on {path}; closing",
                          peer=self.connection.peer_name, path=WS_PATH)
            # Autobahn lets applications send 1000 or 3000-4999 only.
            self.sendClose(code=3003, reason="binary messages only")

    def onMessageFrameData(self, payload):
        """Relay a piece of a binary message at once (autobahn's default would keep it)."""
        if self._relaying and self.connection is not None and not self.failedByMe:
            self.connection.dataReceived(payload)

    def onMessageFrameEnd(self):
        """Nothing was kept for the frame: nothing to assemble."""
        self.frame_data = None

    def onMessageEnd(self):
        """Nothing was kept for the message: nothing to deliver."""
        self._relaying = False
        self.message_data = None

    def onClose(self, wasClean, code, reason):
        """End the proxy connection: leave the pool or close the partner."""
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.connectionLost(Failure(ConnectionDone(f"websocket closed ({code})")))


class ProxyWebSocketFactory(WebSocketServerFactory):
    """Builds L{ProxyWebSocketProtocol}s sharing the proxy's pool."""

    # No "Starting factory <repr>" line at the default level.
    noisy = False
    protocol = ProxyWebSocketProtocol

    def __init__(self, pool, reactor, handshake_timeout=PEER_HANDSHAKE_TIMEOUT,
                 on_relay_end=None):
        """
        @param pool: the proxy's L{PairingPool}.
        @param reactor: the reactor (autobahn's timers and the handshake timeout).
        @param handshake_timeout: seconds allowed for a handshake.
        @param on_relay_end: see L{ProxyConnection}.
        """
        super().__init__(reactor=reactor)
        self.on_relay_end = on_relay_end
        self.pool = pool
        self.clock = reactor
        self.handshake_timeout = handshake_timeout
        # Nothing is held per message (see ProxyWebSocketProtocol), so no
        # size limit is needed to bound memory.
        self.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)

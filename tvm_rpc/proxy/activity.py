"""What the proxy did: connections, refusals, pairs and the bytes they relayed.

Sans-IO counters fed by L{tvm_rpc.proxy.protocol.ProxyConnection} and the
L{tvm_rpc.proxy.pairing.PairingPool}, read by
L{tvm_rpc.proxy.metrics.ProxyCollector} at each scrape. Bytes are counted by
each L{tvm_rpc.proxy.relay.Relay} (one int add per read, or what C{splice}
moved) and summed here when a pair ends; pairs still relaying are read live.
"""

from collections import Counter

import attrs

#: Directions of relayed bytes, as labelled.
TO_SERVER = "client_to_server"
TO_CLIENT = "server_to_client"


@attrs.define(eq=False)
class ProxyActivity:
    """
    The proxy's counters.

    @ivar connections_open: connections accepted and not yet closed.
    @ivar connections_total: connections accepted.
    @ivar refused: handshakes refused, by reason (a short name).
    @ivar pairs: pairs made, by path (C{tcp}, C{websocket}: a pair with a
        websocket side is a websocket pair).
    @ivar ended: pairs ended, by reason (C{closed}: a peer closed its
        connection; C{lost}: a peer's connection failed).
    @ivar relayed: bytes relayed by pairs that ended, by C{(direction, relay)}
        (relay: C{twisted} or C{splice}).
    @ivar active: the relays of the pairs relaying now, each mapped to
        whether its side C{a} is the server.
    """

    connections_open: int = 0
    connections_total: int = 0
    refused: Counter = attrs.field(factory=Counter)
    pairs: Counter = attrs.field(factory=Counter)
    ended: Counter = attrs.field(factory=Counter)
    relayed: Counter = attrs.field(factory=Counter)
    active: dict = attrs.field(factory=dict)

    def connection_opened(self):
        """A connection was accepted."""
        self.connections_open += 1
        self.connections_total += 1

    def connection_closed(self):
        """An accepted connection closed."""
        self.connections_open -= 1

    def refuse(self, reason):
        """A handshake was refused for C{reason} (a short name)."""
        self.refused[reason] += 1

    def pair_started(self, relay, path, a_is_server):
        """
        @param relay: the L{tvm_rpc.proxy.relay.Relay} of a new pair.
        @param path: C{tcp} or C{websocket}.
        @param a_is_server: whether C{relay.a} is the server side.
        """
        self.pairs[path] += 1
        self.active[relay] = a_is_server

    def pair_ended(self, relay, reason):
        """C{relay}'s pair ended for C{reason}: keep what it relayed."""
        a_is_server = self.active.pop(relay, None)
        if a_is_server is None:
            return
        self.ended[reason] += 1
        self.relayed.update(_by_direction(relay, a_is_server))

    def bytes_relayed(self):
        """@return: bytes relayed so far, ended and live pairs, by C{(direction, relay)}."""
        total = Counter(self.relayed)
        for relay, a_is_server in self.active.items():
            total.update(_by_direction(relay, a_is_server))
        return total


def _by_direction(relay, a_is_server):
    """@return: C{relay}'s bytes as a L{Counter} by C{(direction, relay path)}."""
    from_a, from_b = (TO_CLIENT, TO_SERVER) if a_is_server else (TO_SERVER, TO_CLIENT)
    counts = Counter()
    for path, (a_to_b, b_to_a) in relay.moved().items():
        counts[(from_a, path)] += a_to_b
        counts[(from_b, path)] += b_to_a
    return counts

"""The proxy's pure pairing state machine, driven by a fake clock."""

import itertools

import pytest
import attrs
from hypothesis import given, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tvm_rpc.protocol.constants import RPC_CODE_DUPLICATE, RPC_CODE_MISMATCH
from tvm_rpc.proxy.pairing import (
    IOfferObserver,
    IPeer,
    PairingPool,
    Role,
    parse_proxy_key,
)


pytestmark = pytest.mark.unit


@implementer(IPeer)
@attrs.define(eq=False)
class FakePeer:
    """Records what the pool tells it."""

    name: str
    accepted: list = attrs.field(factory=list)
    joined: list = attrs.field(factory=list)
    refused: list = attrs.field(factory=list)

    def accept(self, partner_key):
        self.accepted.append(partner_key)

    def join(self, partner):
        self.joined.append(partner)

    def refuse(self, code, reason):
        self.refused.append((code, reason))


@implementer(IOfferObserver)
@attrs.define
class Observer:
    """Records tracker-mode events."""

    events: list = attrs.field(factory=list)

    def offered(self, offer):
        self.events.append(("offered", offer.key, offer.matchkey))

    def renewed(self, offer, old_matchkey):
        self.events.append(("renewed", offer.key, old_matchkey, offer.matchkey))

    def withdrawn(self, offer):
        self.events.append(("withdrawn", offer.key, offer.matchkey))


def counting_matchkeys():
    """A deterministic matchkey factory: ``<key>:1``, ``<key>:2``, ..."""
    counter = itertools.count(1)
    return lambda key: f"{key}:{next(counter)}"


class ParseKeyTests(SynchronousTestCase):
    """L{parse_proxy_key}."""

    def test_roles(self):
        self.assertEqual(parse_proxy_key("server:rasp"), (Role.SERVER, "rasp"))
        self.assertEqual(parse_proxy_key("client:rasp -timeout=10"), (Role.CLIENT, "rasp"))

    def test_bad_prefix(self):
        for text in ("servers:x", "clientx:y", "abcdefgkey", "", "SERVER:x"):
            self.assertRaises(ValueError, parse_proxy_key, text)

    def test_empty(self):
        for text in ("server:", "client:   ", "client: -timeout=3"[:7]):
            self.assertRaises(ValueError, parse_proxy_key, text)


class PlainModeTests(SynchronousTestCase):
    """Pairing by key without a tracker."""

    def setUp(self):
        self.clock = Clock()
        self.pool = PairingPool(self.clock, timeout_client=30, timeout_server=60)

    def test_peer_interface(self):
        verifyObject(IPeer, FakePeer("x"))

    def test_server_first(self):
        server, client = FakePeer("s"), FakePeer("c")
        self.assertEqual(self.pool.arrive(server, "server:k"), "waiting")
        self.assertEqual(self.pool.waiting(), 1)
        self.assertEqual(self.pool.arrive(client, "client:k -timeout=5"), "paired")
        self.assertEqual(server.accepted, ["client:k -timeout=5"])
        self.assertEqual(client.accepted, ["server:k"])
        self.assertEqual(client.joined, [server])
        self.assertEqual(server.joined, [])
        self.assertEqual(self.pool.waiting(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_client_first(self):
        server, client = FakePeer("s"), FakePeer("c")
        self.assertEqual(self.pool.arrive(client, "client:k"), "waiting")
        self.assertEqual(self.pool.arrive(server, "server:k"), "paired")
        self.assertEqual(client.accepted, ["server:k"])
        self.assertEqual(server.accepted, ["client:k"])
        self.assertEqual(server.joined, [client])

    def test_different_keys_do_not_pair(self):
        server, client = FakePeer("s"), FakePeer("c")
        self.pool.arrive(server, "server:a")
        self.assertEqual(self.pool.arrive(client, "client:b"), "waiting")
        self.assertEqual(self.pool.waiting(), 2)
        self.assertEqual(server.accepted + client.accepted, [])

    def test_duplicate(self):
        first, second = FakePeer("1"), FakePeer("2")
        self.pool.arrive(first, "server:k")
        self.assertEqual(self.pool.arrive(second, "server:k"), "refused")
        self.assertEqual(second.refused[0][0], RPC_CODE_DUPLICATE)
        self.assertEqual(first.refused, [])
        self.assertEqual(self.pool.waiting(), 1)

    def test_timeouts_per_role(self):
        server, client = FakePeer("s"), FakePeer("c")
        self.pool.arrive(client, "client:a")
        self.pool.arrive(server, "server:b")
        self.clock.advance(29.9)
        self.assertEqual(client.refused, [])
        self.clock.advance(0.2)
        self.assertEqual(client.refused[0][0], RPC_CODE_MISMATCH)
        self.assertEqual(server.refused, [])
        self.clock.advance(30)
        self.assertEqual(server.refused[0][0], RPC_CODE_MISMATCH)
        self.assertEqual(self.pool.waiting(), 0)
        late = FakePeer("late")
        self.assertEqual(self.pool.arrive(late, "client:b"), "waiting")

    def test_leave_cleans_up(self):
        server = FakePeer("s")
        self.pool.arrive(server, "server:k")
        self.pool.leave(server)
        self.assertEqual(self.pool.waiting(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        client = FakePeer("c")
        self.assertEqual(self.pool.arrive(client, "client:k"), "waiting")
        self.pool.leave(FakePeer("stranger"))
        self.assertEqual(self.pool.waiting(), 1)

    def test_leave_after_pairing_is_harmless(self):
        server, client = FakePeer("s"), FakePeer("c")
        self.pool.arrive(server, "server:k")
        self.pool.arrive(client, "client:k")
        self.pool.leave(server)
        self.pool.leave(client)
        self.assertEqual(self.pool.waiting(), 0)

    def test_bad_prefix_refused(self):
        peer = FakePeer("p")
        self.assertEqual(self.pool.arrive(peer, "abcdefgk"), "refused")
        self.assertEqual(peer.refused[0][0], RPC_CODE_MISMATCH)
        self.assertEqual(self.pool.waiting(), 0)

    def test_close_cancels_timers(self):
        self.pool.arrive(FakePeer("s"), "server:k")
        self.pool.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.pool.waiting(), 0)


class TrackerModeTests(SynchronousTestCase):
    """Pairing by matchkey when the proxy registers its servers with a tracker."""

    def setUp(self):
        self.clock = Clock()
        self.observer = Observer()
        self.pool = PairingPool(self.clock, tracker_mode=True, observer=self.observer,
                                make_matchkey=counting_matchkeys())

    def test_observer_interface(self):
        verifyObject(IOfferObserver, self.observer)

    def test_server_offered_and_claimed(self):
        server, client = FakePeer("s"), FakePeer("c")
        self.assertEqual(self.pool.arrive(server, "server:rasp"), "waiting")
        self.assertEqual(self.observer.events, [("offered", "rasp", "rasp:1")])
        self.assertEqual(self.pool.keys(), ["rasp"])
        self.assertEqual(self.pool.arrive(client, "client:rasp:1 -timeout=7"), "paired")
        self.assertEqual(server.accepted, ["client:rasp:1 -timeout=7"])
        self.assertEqual(client.accepted, ["server:rasp"])
        self.assertEqual(client.joined, [server])
        self.assertEqual(self.observer.events[-1], ("withdrawn", "rasp", "rasp:1"))
        self.assertEqual(self.pool.offers(), [])

    def test_servers_wait_without_timeout(self):
        self.pool.arrive(FakePeer("s"), "server:rasp")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_same_key_twice_is_two_offers(self):
        self.pool.arrive(FakePeer("1"), "server:rasp")
        self.pool.arrive(FakePeer("2"), "server:rasp")
        self.assertEqual([o.matchkey for o in self.pool.offers()], ["rasp:1", "rasp:2"])
        self.assertEqual(self.pool.keys(), ["rasp"])

    def test_unknown_matchkey(self):
        self.pool.arrive(FakePeer("s"), "server:rasp")
        client = FakePeer("c")
        self.assertEqual(self.pool.arrive(client, "client:rasp"), "refused")
        self.assertEqual(client.refused[0][0], RPC_CODE_MISMATCH)
        self.assertEqual(len(self.pool.offers()), 1)

    def test_matchkey_used_once(self):
        self.pool.arrive(FakePeer("s"), "server:rasp")
        self.pool.arrive(FakePeer("c1"), "client:rasp:1")
        late = FakePeer("c2")
        self.assertEqual(self.pool.arrive(late, "client:rasp:1"), "refused")

    def test_renewal_keeps_the_key(self):
        server = FakePeer("s")
        self.pool.arrive(server, "server:my:key")
        offer = self.pool.offers()[0]
        self.assertEqual(self.pool.renew(offer), "my:key:2")
        self.assertEqual(offer.key, "my:key")
        self.assertIn(("renewed", "my:key", "my:key:1", "my:key:2"), self.observer.events)
        stale = FakePeer("stale")
        self.assertEqual(self.pool.arrive(stale, "client:my:key:1"), "refused")
        self.assertEqual(self.pool.arrive(FakePeer("c"), "client:my:key:2"), "paired")
        self.assertIsNone(self.pool.renew(offer))

    def test_server_leaves(self):
        server = FakePeer("s")
        self.pool.arrive(server, "server:rasp")
        self.pool.leave(server)
        self.assertEqual(self.observer.events[-1], ("withdrawn", "rasp", "rasp:1"))
        self.assertEqual(self.pool.keys(), [])
        client = FakePeer("c")
        self.assertEqual(self.pool.arrive(client, "client:rasp:1"), "refused")

    def test_observer_failure_does_not_break_pairing(self):
        class Broken(Observer):
            def offered(self, offer):
                raise RuntimeError("boom")

        pool = PairingPool(self.clock, tracker_mode=True, observer=Broken(),
                           make_matchkey=counting_matchkeys())
        pool.arrive(FakePeer("s"), "server:rasp")
        self.assertEqual(pool.arrive(FakePeer("c"), "client:rasp:1"), "paired")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


_events = st.lists(
    st.tuples(
        st.sampled_from(["arrive", "leave", "tick"]),
        st.sampled_from(["server", "client"]),
        st.sampled_from(["a", "b"]),
        st.integers(0, 5),
    ),
    max_size=60,
)


@given(_events)
def test_plain_mode_invariants(events):
    """
    Whatever happens, a peer is paired at most once, never with a peer of the
    same role or another key, and nothing refused or paired stays waiting.
    """
    clock = Clock()
    pool = PairingPool(clock, timeout_client=3, timeout_server=4)
    peers = []
    roles = {}
    left = set()
    for action, role, key, index in events:
        if action == "arrive":
            peer = FakePeer(f"{role}{len(peers)}")
            peers.append(peer)
            roles[peer] = (role, key)
            pool.arrive(peer, f"{role}:{key}")
        elif action == "leave" and peers:
            gone = peers[index % len(peers)]
            left.add(gone)
            pool.leave(gone)
        else:
            clock.advance(index)
    for peer in peers:
        assert len(peer.accepted) <= 1
        assert len(peer.refused) <= 1
        assert not (peer.accepted and peer.refused)
        for partner in peer.joined:
            assert roles[partner][0] != roles[peer][0]
            assert roles[partner][1] == roles[peer][1]
    waiting = [p for p in peers if not (p.accepted or p.refused or p in left)]
    assert pool.waiting() == len(waiting)
    for key in "ab":
        sides = {roles[p][0] for p in waiting if roles[p][1] == key}
        assert sides != {"server", "client"}
        assert len([p for p in waiting if roles[p][1] == key]) <= 2
    pool.close()
    assert clock.getDelayedCalls() == []


_tracker_events = st.lists(
    st.tuples(
        st.sampled_from(["server", "client", "stale", "leave", "renew"]),
        st.sampled_from(["a", "b", "c:d"]),
        st.integers(0, 7),
    ),
    max_size=60,
)


@given(_tracker_events)
def test_tracker_mode_invariants(events):
    """
    Whatever servers, clients, departures and renewals happen, the observer's
    view (offered minus withdrawn) is exactly the waiting servers, matchkeys
    are unique and keep the server's key, and a client is paired only with
    the server whose current matchkey it presented.
    """
    clock = Clock()
    observer = Observer()
    pool = PairingPool(clock, tracker_mode=True, observer=observer,
                       make_matchkey=counting_matchkeys())
    servers = []
    used = set()
    for action, key, index in events:
        if action == "server":
            peer = FakePeer(f"s{len(servers)}")
            servers.append((peer, key))
            pool.arrive(peer, f"server:{key}")
        elif action in ("client", "stale") and pool.offers():
            offers = pool.offers()
            offer = offers[index % len(offers)]
            matchkey = offer.matchkey if action == "client" else offer.matchkey + ":stale"
            client = FakePeer("c")
            outcome = pool.arrive(client, f"client:{matchkey} -timeout=5")
            if action == "client":
                assert outcome == "paired"
                assert client.joined == [offer.peer]
                assert offer.peer.accepted == [f"client:{matchkey} -timeout=5"]
                assert client.accepted == [f"server:{offer.key}"]
                used.add(matchkey)
            else:
                assert outcome == "refused"
        elif action == "leave" and servers:
            pool.leave(servers[index % len(servers)][0])
        elif action == "renew" and pool.offers():
            offers = pool.offers()
            offer = offers[index % len(offers)]
            old = offer.matchkey
            assert pool.renew(offer) != old
    live = {}
    for event in observer.events:
        if event[0] == "offered":
            live[event[2]] = event[1]
        elif event[0] == "renewed":
            del live[event[2]]
            live[event[3]] = event[1]
        else:
            del live[event[2]]
    offers = pool.offers()
    assert live == {offer.matchkey: offer.key for offer in offers}
    assert len({offer.matchkey for offer in offers}) == len(offers)
    for offer in offers:
        assert offer.matchkey.rpartition(":")[0] == offer.key
        assert offer.matchkey not in used
    assert pool.keys() == sorted({offer.key for offer in offers})
    assert clock.getDelayedCalls() == []

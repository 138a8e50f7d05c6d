"""Property tests of the pure scheduler and tracker state (hypothesis)."""

import types

from hypothesis import given, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
import pytest
from twisted.internet.task import Clock
from zope.interface import implementer

from tvm_rpc.protocol.tracker_commands import Allocation, Put, Request, UpdateInfo
from tvm_rpc.tracker.limits import TrackerLimits
from tvm_rpc.tracker.scheduler import Offer, Scheduler, Status, Waiter
from tvm_rpc.tracker.state import ITrackerPeer, TrackerState

pytestmark = pytest.mark.unit


KEYS = ["a", "b:c"]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(KEYS)),
        st.tuples(st.just("request"), st.sampled_from(KEYS), st.sampled_from([0, 1, 2, 2.5])),
        st.tuples(st.just("withdraw"), st.integers(0, 200)),
        st.tuples(st.just("remove"), st.integers(0, 200)),
    ),
    max_size=120,
)


@given(ops)
def test_scheduler_matches_naive_model(operations):
    """Against a sort-based model: priority then FIFO for requests, oldest free
    server first, nothing handed out twice, counts always right."""
    scheduler = Scheduler()
    waiting = {k: [] for k in KEYS}
    free = {k: [] for k in KEYS}
    waiters, offers, seq = [], [], 0
    handed = set()
    for op in operations:
        seq += 1
        if op[0] == "put":
            offer = Offer(op[1], seq)
            offers.append(offer)
            got = scheduler.put(offer)
            if waiting[op[1]]:
                best = min(waiting[op[1]], key=lambda w: (-w.priority, w.payload))
                waiting[op[1]].remove(best)
                assert got is best and best.status is offer.status is Status.MATCHED
                assert id(offer) not in handed
                handed.add(id(offer))
            else:
                assert got is None and offer.status is Status.QUEUED
                free[op[1]].append(offer)
        elif op[0] == "request":
            waiter = Waiter(op[1], op[2], seq)
            waiters.append(waiter)
            got = scheduler.request(waiter)
            if free[op[1]]:
                oldest = free[op[1]].pop(0)
                assert got is oldest and id(oldest) not in handed
                handed.add(id(oldest))
            else:
                assert got is None
                waiting[op[1]].append(waiter)
        elif op[0] == "withdraw" and waiters:
            waiter = waiters[op[1] % len(waiters)]
            expected = waiter in waiting[waiter.key]
            assert scheduler.withdraw(waiter) == expected
            if expected:
                waiting[waiter.key].remove(waiter)
        elif op[0] == "remove" and offers:
            offer = offers[op[1] % len(offers)]
            expected = offer in free[offer.key]
            assert scheduler.remove(offer) == expected
            if expected:
                free[offer.key].remove(offer)
        for key in KEYS:
            assert scheduler.counts(key) == (len(free[key]), len(waiting[key]))


def test_withdrawn_majority_is_compacted_in_order():
    """Many withdrawals shrink the heap and keep priority/FIFO order."""
    scheduler = Scheduler()
    waiters = [Waiter("k", i % 3, i) for i in range(1000)]
    for waiter in waiters:
        scheduler.request(waiter)
    for waiter in waiters[:900]:
        scheduler.withdraw(waiter)
    assert len(scheduler._queues["k"]._heap) < 300
    served = [scheduler.put(Offer("k")).payload for _ in range(100)]
    assert served == sorted(range(900, 1000), key=lambda i: (-(i % 3), i))
    assert scheduler.counts("k") == (0, 0)


def test_reused_objects_refused():
    """A waiter or offer cannot be queued twice, nor withdrawn once matched."""
    scheduler = Scheduler()
    waiter, offer = Waiter("k"), Offer("k")
    scheduler.request(waiter)
    scheduler.put(offer)
    for call, thing in ((scheduler.request, waiter), (scheduler.put, offer)):
        try:
            call(thing)
        except ValueError:
            pass
        else:
            raise AssertionError("reuse accepted")
    assert not scheduler.withdraw(waiter) and not scheduler.remove(offer)


@implementer(ITrackerPeer)
class RecordingPeer:
    """Records the answers the state sends."""

    def __init__(self):
        """Start with no answers."""
        self.answers = []

    def answer_request(self, pending, result):
        """Record C{result}."""
        self.answers.append(result)


#: Seconds an unused key stays listed in L{TrackerMachine}.
KEY_IDLE = 3


class TrackerMachine(RuleBasedStateMachine):
    """Puts, requests (with and without deadlines), cancels, UPDATE_INFO,
    disconnects and time passing, against a simple model of TVM's rules, and
    of unused keys forgotten after L{KEY_IDLE} seconds."""

    def __init__(self):
        """A fresh tracker state on a fake clock, and an empty model."""
        super().__init__()
        self.clock = Clock()
        self.state = TrackerState(self.clock, TrackerLimits(key_idle_timeout=KEY_IDLE))
        self.unused_since = {}
        self.peers, self.connections, self.open = [], [], []
        self.expected = []
        self.free = {k: [] for k in KEYS}
        self.waiting = {k: [] for k in KEYS}
        self.leases = {}
        self.seen_keys = set()
        self.handed = set()
        self.seq = 0
        self.pendings = []

    def _pick(self, index):
        """@return: an open connection's index chosen by C{index}, or L{None}."""
        return self.open[index % len(self.open)] if self.open else None

    @rule()
    def connect(self):
        """A new connection."""
        peer = RecordingPeer()
        index = len(self.peers)
        self.peers.append(peer)
        self.connections.append(self.state.connect(peer, f"10.0.0.{index}", 1000 + index))
        self.expected.append([])
        self.open.append(index)

    @rule(who=st.integers(0, 50), key=st.sampled_from(KEYS), again=st.booleans())
    def put(self, who, key, again):
        """A PUT of a fresh matchkey, or again of one still free."""
        index = self._pick(who)
        if index is None:
            return
        connection = self.connections[index]
        mine = [m for m in connection.offers if m.rsplit(":", 1)[0] == key]
        if again and mine:
            matchkey = mine[0]
            self.free[key] = [f for f in self.free[key] if f[1] != matchkey or f[0] != index]
        else:
            self.seq += 1
            matchkey = f"{key}:{self.seq}"
        self.seen_keys.add(key)
        self.state.put(connection, Put(key, 9000 + index, matchkey, None))
        held = self.leases.get((index, key))
        if held:
            self.leases[(index, key)] = held - 1
        if self.waiting[key]:
            best = min(self.waiting[key], key=lambda w: (-w[1], w[2]))
            self.waiting[key].remove(best)
            self._handed(best[0], index, key, matchkey)
        else:
            self.free[key].append((index, matchkey))

    def _handed(self, client, server, key, matchkey):
        """Expect C{client} to be answered with C{server}'s matchkey."""
        assert (server, matchkey) not in self.handed
        self.handed.add((server, matchkey))
        self.expected[client].append(Allocation(f"10.0.0.{server}", 9000 + server, matchkey))
        self.leases[(server, key)] = self.leases.get((server, key), 0) + 1

    @rule(
        who=st.integers(0, 50),
        key=st.sampled_from(KEYS),
        priority=st.sampled_from([0, 1, 1, 5]),
        timeout=st.sampled_from([None, None, 1, 3]),
    )
    def request(self, who, key, priority, timeout):
        """A REQUEST, maybe with a deadline."""
        index = self._pick(who)
        if index is None:
            return
        self.seq += 1
        self.seen_keys.add(key)
        pending = self.state.request(
            self.connections[index], Request(key, "u", priority, timeout)
        )
        if self.free[key]:
            server, matchkey = self.free[key].pop(0)
            self._handed(index, server, key, matchkey)
        else:
            deadline = None if timeout is None else self.clock.seconds() + timeout
            entry = (index, priority, self.seq, deadline, pending)
            self.waiting[key].append(entry)
            self.pendings.append((key, entry))

    @rule(which=st.integers(0, 100))
    def cancel(self, which):
        """Withdraw a request (answered ones report that they were not waiting)."""
        if not self.pendings:
            return
        key, entry = self.pendings[which % len(self.pendings)]
        was_waiting = entry in self.waiting[key]
        assert self.state.cancel(entry[4]) == was_waiting
        if was_waiting:
            self.waiting[key].remove(entry)

    @rule(who=st.integers(0, 50), server=st.booleans())
    def update_info(self, who, server):
        """UPDATE_INFO as a server or as something else."""
        index = self._pick(who)
        if index is None:
            return
        key = "server:a" if server else "client"
        self.state.update_info(self.connections[index], UpdateInfo({"key": key, "addr": [None, 1]}))

    @rule(who=st.integers(0, 50))
    def disconnect(self, who):
        """A connection closes."""
        index = self._pick(who)
        if index is None:
            return
        self.open.remove(index)
        self.state.disconnect(self.connections[index])
        for key in KEYS:
            self.free[key] = [f for f in self.free[key] if f[0] != index]
            self.waiting[key] = [w for w in self.waiting[key] if w[0] != index]
            self.leases.pop((index, key), None)

    @rule(seconds=st.sampled_from([0.5, 1, 2]))
    def advance(self, seconds):
        """Time passes; deadlines expire."""
        now = self.clock.seconds() + seconds
        for key in KEYS:
            for entry in list(self.waiting[key]):
                if entry[3] is not None and entry[3] <= now:
                    self.waiting[key].remove(entry)
                    self.expected[entry[0]].append("expired")
        self.clock.advance(seconds)

    def _settle_unused(self):
        """
        A listed key with no free server, no waiting request
        and no lease is unused since now, unless already unused; one unused
        for KEY_IDLE seconds is forgotten (and seen afresh when used again).
        """
        now = self.clock.seconds()
        for key in KEYS:
            used = (self.free[key] or self.waiting[key]
                    or any(n for (_, k), n in self.leases.items() if k == key))
            if key not in self.seen_keys or used:
                self.unused_since.pop(key, None)
                continue
            since = self.unused_since.setdefault(key, now)
            if since <= now - KEY_IDLE:
                self.seen_keys.discard(key)
                del self.unused_since[key]

    @invariant()
    def answers_match_model(self):
        """Every peer got exactly the answers the model expects, in order."""
        for peer, expected in zip(self.peers, self.expected):
            got = ["expired" if isinstance(a, str) else a for a in peer.answers]
            assert sorted(map(repr, got)) == sorted(map(repr, expected))
            assert [a for a in got if a != "expired"] == [a for a in expected if a != "expired"]

    @invariant()
    def summary_consistent(self):
        """SUMMARY's counts, leases and server_info agree with the model."""
        self._settle_unused()
        summary = self.state.summary()
        assert summary["queue_info"] == {
            key: {"free": len(self.free[key]), "pending": len(self.waiting[key])}
            for key in self.seen_keys
        }
        assert len(summary["leases"]) == sum(self.leases.values())
        servers = [
            i for i in self.open if self.connections[i].info.get("key") == "server:a"
        ]
        assert len(summary["server_info"]) == len(servers)

    @invariant()
    def pending_matchkeys_consistent(self):
        """Each connection's pending matchkeys are its free servers."""
        for index in self.open:
            mine = [m for key in KEYS for (i, m) in self.free[key] if i == index]
            assert sorted(self.state.pending_matchkeys(self.connections[index])) == sorted(mine)

    @invariant()
    def no_timer_leaks(self):
        """Only waiting requests with deadlines have timers."""
        live = sum(1 for key in KEYS for w in self.waiting[key] if w[3] is not None)
        assert len(self.clock.getDelayedCalls()) == live


TestTrackerMachine = TrackerMachine.TestCase


#: The modules whose objects a tracker state is made of.
_TRACKER_MODULES = ("tvm_rpc.tracker.", "tvm_rpc.protocol.tracker_commands", __name__)


def _tracker_garbage(garbage):
    """
    @return: the objects of C{garbage} that belong to the tracker state
        under test: instances of the tracker's classes and of its commands,
        and the tracker's functions and bound methods. Garbage that other
        threads of the test process make or release meanwhile (daemon output
        readers, a reactor thread, other daemons' objects) is not the
        tracker's.
    """
    def ours(thing):
        module = getattr(type(thing), "__module__", "") or ""
        if isinstance(thing, types.MethodType):
            thing = thing.__func__
        if isinstance(thing, types.FunctionType):
            module = thing.__module__ or ""
        return module.startswith(_TRACKER_MODULES)

    return [thing for thing in garbage if ours(thing)]


def test_served_requests_leave_no_cyclic_garbage():
    """Matched, expired and withdrawn requests are freed by reference counting,
    so a busy tracker gives the cyclic collector (and its pauses) no work."""
    import gc

    clock = Clock()
    state = TrackerState(clock)
    server, client = RecordingPeer(), RecordingPeer()
    server_connection = state.connect(server, "10.0.0.1", 1)
    client_connection = state.connect(client, "10.0.0.2", 2)
    gc.collect()
    gc.disable()
    try:
        for i in range(200):
            state.put(server_connection, Put("k", 9000, f"k:{i}"))
            state.request(client_connection, Request("k", "u", i % 3, 5.0))
            state.request(client_connection, Request("k", "u", 1, 1.0))
            clock.advance(2)
            state.cancel(state.request(client_connection, Request("k", "u", 1)))
            client.answers.clear()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        assert _tracker_garbage(gc.garbage) == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


class _Time:
    """A settable clock for the scheduler."""

    def __init__(self):
        """Start at 1000 s."""
        self.now = 1000.0

    def __call__(self):
        """@return: the current time."""
        return self.now


key_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from("abcde")),
        st.tuples(st.just("request"), st.sampled_from("abcde")),
        st.tuples(st.just("withdraw"), st.integers(0, 200)),
        st.tuples(st.just("remove"), st.integers(0, 200)),
        st.tuples(st.just("hold"), st.sampled_from("abcde")),
        st.tuples(st.just("release"), st.sampled_from("abcde")),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 1, 3, 10])),
        st.tuples(st.just("summary"),),
    ),
    max_size=150,
)


@given(key_ops, st.sampled_from([None, 2, 4]), st.sampled_from([None, 1, 3, 5]))
def test_unused_keys_forgotten_and_bounded(operations, idle_timeout, max_keys):
    """
    Against a model that scans every key: a key stays listed while a server
    is free, a request waits or a server is held, and for C{idle_timeout}
    seconds after; a new key beyond C{max_keys} evicts the key unused
    longest, or is refused when every key is in use; the listed keys never
    exceed C{max_keys}.
    """
    from tvm_rpc.tracker.scheduler import KeyLimitExceeded

    clock = _Time()
    scheduler = Scheduler(now=clock, idle_timeout=idle_timeout, max_keys=max_keys)
    listed = {}      # key -> None (in use) or (since, order) once unused
    model = {}       # key -> [free offers, waiting waiters, held]
    order = iter(range(10**6))
    waiters, offers = [], []

    def sweep():
        """Forget the keys unused for idle_timeout seconds or more."""
        if idle_timeout is None:
            return
        for key, since in list(listed.items()):
            if since is not None and since[0] <= clock.now - idle_timeout:
                del listed[key], model[key]

    def make_room(key):
        """@return: whether C{key} is listed or could be added (evicting if needed)."""
        if key in listed:
            return True
        sweep()
        if max_keys is not None and len(listed) >= max_keys:
            unused = [k for k, since in listed.items() if since is not None]
            if not unused:
                return False
            oldest = min(unused, key=lambda k: listed[k][1])
            del listed[oldest], model[oldest]
        listed[key] = None
        model[key] = [[], [], 0]
        return True

    def settle(key):
        """Note whether C{key} is in use now."""
        if key not in model:
            return
        free, waiting, held = model[key]
        if free or waiting or held:
            listed[key] = None
        elif listed[key] is None:
            listed[key] = (clock.now, next(order))

    for op in operations:
        kind = op[0]
        if kind in ("put", "request"):
            key = op[1]
            room = make_room(key)
            thing = Offer(key) if kind == "put" else Waiter(key)
            call = scheduler.put if kind == "put" else scheduler.request
            if not room:
                try:
                    call(thing)
                except KeyLimitExceeded:
                    continue
                raise AssertionError("a key beyond max_keys was accepted")
            got = call(thing)
            free, waiting, _ = model[key]
            if kind == "put":
                offers.append(thing)
                if waiting:
                    best = min(waiting, key=lambda w: w._seq)
                    waiting.remove(best)
                    assert got is best
                else:
                    assert got is None
                    free.append(thing)
            else:
                waiters.append(thing)
                if free:
                    assert got is free.pop(0)
                else:
                    assert got is None
                    waiting.append(thing)
            settle(key)
        elif kind == "withdraw" and waiters:
            waiter = waiters[op[1] % len(waiters)]
            if scheduler.withdraw(waiter):
                model[waiter.key][1].remove(waiter)
                settle(waiter.key)
        elif kind == "remove" and offers:
            offer = offers[op[1] % len(offers)]
            if scheduler.remove(offer):
                model[offer.key][0].remove(offer)
                settle(offer.key)
        elif kind == "hold" and op[1] in listed:
            scheduler.hold(op[1])
            model[op[1]][2] += 1
            settle(op[1])
        elif kind == "release":
            scheduler.release(op[1])
            if op[1] in model and model[op[1]][2]:
                model[op[1]][2] -= 1
                settle(op[1])
        elif kind == "advance":
            clock.now += op[1]
        elif kind == "summary":
            sweep()
            assert scheduler.summary() == {
                key: {"free": len(model[key][0]), "pending": len(model[key][1])}
                for key in listed
            }
        if max_keys is not None:
            assert scheduler.keys() <= max_keys
    sweep()
    assert set(scheduler.summary()) == set(listed)


def test_twenty_thousand_departed_keys_are_forgotten():
    """20,000 keys of peers that left stay listed only for the idle period."""
    clock = Clock()
    state = TrackerState(clock, TrackerLimits(key_idle_timeout=60, max_keys=50_000))
    peer = RecordingPeer()
    for i in range(20_000):
        connection = state.connect(peer, "10.0.0.1", i)
        state.put(connection, Put(f"key{i}", 9000, f"key{i}:1"))
        state.disconnect(connection)
    queue_info = state.summary()["queue_info"]
    assert len(queue_info) == 20_000
    assert queue_info["key7"] == {"free": 0, "pending": 0}
    clock.advance(59)
    assert len(state.summary()["queue_info"]) == 20_000
    clock.advance(1)
    assert state.summary()["queue_info"] == {}
    assert state.scheduler.keys() == 0


def test_held_server_keeps_its_key():
    """A key whose only server is handed out stays listed as long as the lease."""
    clock = Clock()
    state = TrackerState(clock, TrackerLimits(key_idle_timeout=10))
    server, client = RecordingPeer(), RecordingPeer()
    server_connection = state.connect(server, "10.0.0.1", 1)
    client_connection = state.connect(client, "10.0.0.2", 2)
    state.put(server_connection, Put("k", 9000, "k:1"))
    state.request(client_connection, Request("k"))
    clock.advance(3600)
    assert state.summary()["queue_info"] == {"k": {"free": 0, "pending": 0}}
    state.put(server_connection, Put("k", 9000, "k:2"))
    state.request(client_connection, Request("k"))
    state.disconnect(server_connection)
    clock.advance(9)
    assert "k" in state.summary()["queue_info"]
    clock.advance(1)
    assert state.summary()["queue_info"] == {}


def test_priority_clamped_to_the_cap():
    """A priority above the cap is queued at the cap: FIFO among those at the cap."""
    clock = Clock()
    state = TrackerState(clock, TrackerLimits(max_priority=100))
    peers = [RecordingPeer() for _ in range(4)]
    connections = [state.connect(p, f"10.0.0.{i}", i) for i, p in enumerate(peers)]
    first = state.request(connections[0], Request("k", "", 10**6))
    second = state.request(connections[1], Request("k", "", 100))
    low = state.request(connections[2], Request("k", "", 99))
    assert (first.priority, second.priority, low.priority) == (100, 100, 99)
    for i in range(3):
        state.put(connections[3], Put("k", 9000, f"k:{i}"))
    assert [p.answers[0].matchkey for p in peers[:3]] == ["k:0", "k:1", "k:2"]

"""The tracker's pure scheduler: one priority queue of requests per device key.

No Twisted, no I/O. Each key has a heap of waiting requests ordered by
(-priority, arrival) and an insertion-ordered set of free servers handed out
oldest first. Every operation is O(log n) or O(1) amortised: withdrawn
requests are deleted lazily from the heap, which is rebuilt when the dead
entries outnumber the live ones.

A key nobody uses (no free server, no waiting request, no server held) is
kept for a while, as TVM keeps it for ever, then forgotten; the number of keys
is bounded. Unused keys wait in an ordered dict by the time they became
unused, so forgetting costs O(1) per key forgotten.
"""

import enum
import heapq
import itertools
from collections import OrderedDict

import attrs


class Status(enum.Enum):
    """Where a L{Waiter} or an L{Offer} stands."""

    NEW = "new"
    QUEUED = "queued"
    MATCHED = "matched"
    WITHDRAWN = "withdrawn"


@attrs.define(eq=False)
class Waiter:
    """
    A request for a server of C{key}.

    @ivar key: the device key wanted.
    @ivar priority: higher is served first; equal priorities are served in
        arrival order.
    @ivar payload: whatever the caller wants back with the match.
    @ivar status: set by the L{Scheduler}.

    Subclasses may add fields (keyword-only); matched objects hold no
    reference to their partner, so they die by reference counting, without
    work for the cyclic garbage collector.
    """

    key: str
    priority: float = 1
    payload: object = None
    status: Status = attrs.field(default=Status.NEW, init=False)
    _seq: int = attrs.field(default=-1, init=False, repr=False)


@attrs.define(eq=False)
class Offer:
    """
    A free server of C{key}.

    @ivar key: the device key served.
    @ivar payload: whatever the caller wants back with the match.
    @ivar status: set by the L{Scheduler}.
    """

    key: str
    payload: object = None
    status: Status = attrs.field(default=Status.NEW, init=False)
    _seq: int = attrs.field(default=-1, init=False, repr=False)


@attrs.define(eq=False)
class KeyQueue:
    """
    The requests and free servers of one key.

    @ivar pending: how many requests wait (withdrawn ones excluded).
    """

    _heap: list = attrs.field(factory=list)
    _free: OrderedDict = attrs.field(factory=OrderedDict)
    pending: int = 0
    held: int = 0

    @property
    def free(self):
        """How many servers are free."""
        return len(self._free)

    @property
    def unused(self):
        """Whether no server is free, no request waits and no server is held."""
        return not self._free and not self.pending and not self.held

    def push_waiter(self, waiter):
        """Queue a request."""
        heapq.heappush(self._heap, (-waiter.priority, waiter._seq, waiter))
        self.pending += 1

    def pop_waiter(self):
        """@return: the best live waiter, or L{None}."""
        heap = self._heap
        while heap:
            waiter = heapq.heappop(heap)[2]
            if waiter.status is Status.QUEUED:
                self.pending -= 1
                return waiter
        return None

    def forget_waiter(self):
        """Account for a waiter withdrawn in place; compact when mostly dead."""
        self.pending -= 1
        dead = len(self._heap) - self.pending
        if dead > 64 and dead > self.pending:
            self._heap = [e for e in self._heap if e[2].status is Status.QUEUED]
            heapq.heapify(self._heap)

    def push_offer(self, offer):
        """Queue a free server, last in line."""
        self._free[offer._seq] = offer

    def pop_offer(self):
        """@return: the oldest free offer, or L{None}."""
        if not self._free:
            return None
        return self._free.popitem(last=False)[1]

    def drop_offer(self, offer):
        """Take a queued free server out, in O(1)."""
        del self._free[offer._seq]

    def offers(self, limit=None):
        """@return: up to C{limit} free L{Offer}s, in the order they are handed out."""
        return list(itertools.islice(self._free.values(), limit))

    def waiters(self, limit=None):
        """
        @return: up to C{limit} waiting L{Waiter}s, in the order they are
            served (a walk of the heap: for status pages, not the hot path).
        """
        live = [entry for entry in self._heap if entry[2].status is Status.QUEUED]
        if limit is not None and limit < len(live):
            live = heapq.nsmallest(limit, live)
        else:
            live.sort()
        return [entry[2] for entry in live]


class KeyLimitExceeded(ValueError):
    """A new key was needed while every one of the most keys allowed is in use."""


def _no_time():
    """The clock of a L{Scheduler} that is given none: time stands still."""
    return 0.0


@attrs.define
class Scheduler:
    """
    Matches requests with free servers, per key.

    Keys stay listed in L{summary} while anything uses them (a free server, a
    waiting request, or a server held through L{hold}) and for
    C{idle_timeout} seconds after, as in TVM's tracker (which keeps them for
    ever); then they are forgotten. At most C{max_keys} keys are listed: a
    new key first evicts the longest-unused key, and is refused when every
    key is in use.

    @ivar now: a callable returning the current time in seconds.
    @ivar idle_timeout: seconds an unused key stays listed, or L{None} for
        ever.
    @ivar max_keys: the most keys listed at once, or L{None} for no bound.
    """

    _queues: dict = attrs.field(factory=dict)
    _counter: "itertools.count" = attrs.field(factory=itertools.count)
    now: object = _no_time
    idle_timeout: "float | None" = None
    max_keys: "int | None" = None
    _unused: OrderedDict = attrs.field(factory=OrderedDict, init=False)

    def _queue(self, key):
        """
        @return: the L{KeyQueue} of C{key}, created on first sight.
        @raise KeyLimitExceeded: when C{key} is new and C{max_keys} keys are
            all in use.
        """
        queue = self._queues.get(key)
        if queue is None:
            self.forget_unused()
            if self.max_keys is not None and len(self._queues) >= self.max_keys:
                if not self._unused:
                    raise KeyLimitExceeded(f"more than {self.max_keys} keys in use")
                oldest, _ = self._unused.popitem(last=False)
                del self._queues[oldest]
            queue = self._queues[key] = KeyQueue()
        return queue

    def _settle(self, key, queue):
        """Note whether C{key} is now unused (since now) or in use."""
        if queue.unused:
            if key not in self._unused:
                self._unused[key] = self.now()
        elif self._unused:
            self._unused.pop(key, None)

    def forget_unused(self):
        """
        Forget the keys unused for C{idle_timeout} seconds or more.

        @return: how many keys were forgotten.
        """
        if self.idle_timeout is None or not self._unused:
            return 0
        cutoff = self.now() - self.idle_timeout
        unused, queues = self._unused, self._queues
        forgotten = 0
        while unused:
            key, since = next(iter(unused.items()))
            if since > cutoff:
                break
            del unused[key]
            del queues[key]
            forgotten += 1
        return forgotten

    def hold(self, key):
        """
        Count a server of C{key} as held (handed out, not free again yet), so
        the key stays listed meanwhile. Each call needs one L{release}.
        """
        queue = self._queue(key)
        queue.held += 1
        self._settle(key, queue)

    def release(self, key):
        """Undo one L{hold} of C{key}."""
        queue = self._queues.get(key)
        if queue is not None and queue.held > 0:
            queue.held -= 1
            self._settle(key, queue)

    def put(self, offer):
        """
        Offer a free server.

        @param offer: a new L{Offer}.
        @return: the L{Waiter} it was handed to at once, or L{None} if it is
            now queued as free.
        @raise ValueError: if C{offer} was used before.
        """
        return self._arrive(offer, "offer", KeyQueue.pop_waiter, KeyQueue.push_offer)

    def request(self, waiter):
        """
        Ask for a server.

        @param waiter: a new L{Waiter}.
        @return: the L{Offer} it obtained at once, or L{None} if it now waits.
        @raise ValueError: if C{waiter} was used before.
        """
        return self._arrive(waiter, "waiter", KeyQueue.pop_offer, KeyQueue.push_waiter)

    def _arrive(self, entry, kind, take_partner, enqueue):
        """
        Number a new offer or waiter and match it with the first partner in
        its key's queue, or queue it when there is none.

        @param kind: C{"offer"} or C{"waiter"}, for the error.
        @param take_partner: the L{KeyQueue} method popping the other kind.
        @param enqueue: the L{KeyQueue} method queueing C{entry}'s kind.
        @return: the partner, or L{None} if C{entry} is now queued.
        @raise ValueError: if C{entry} was used before.
        """
        if entry.status is not Status.NEW:
            raise ValueError(f"{kind} already {entry.status.value}")
        entry._seq = next(self._counter)
        queue = self._queue(entry.key)
        partner = take_partner(queue)
        if partner is None:
            entry.status = Status.QUEUED
            enqueue(queue, entry)
        else:
            partner.status = entry.status = Status.MATCHED
        self._settle(entry.key, queue)
        return partner

    def withdraw(self, waiter):
        """
        Take back a waiting request.

        @return: whether it was waiting (false if already matched or gone).
        """
        if waiter.status is not Status.QUEUED:
            return False
        waiter.status = Status.WITHDRAWN
        queue = self._queues[waiter.key]
        queue.forget_waiter()
        self._settle(waiter.key, queue)
        return True

    def remove(self, offer):
        """
        Take back a free server.

        @return: whether it was free (false if already handed out or gone).
        """
        if offer.status is not Status.QUEUED:
            return False
        offer.status = Status.WITHDRAWN
        queue = self._queues[offer.key]
        queue.drop_offer(offer)
        self._settle(offer.key, queue)
        return True

    def counts(self, key):
        """@return: C{(free, pending)} for C{key}; zeros for an unseen key."""
        queue = self._queues.get(key)
        if queue is None:
            return 0, 0
        return queue.free, queue.pending

    def keys(self):
        """@return: how many keys are listed."""
        return len(self._queues)

    def queues(self):
        """
        @return: C{[(key, KeyQueue), ...]} of every key listed, after
            forgetting the keys unused for too long.
        """
        self.forget_unused()
        return list(self._queues.items())

    def summary(self):
        """
        @return: TVM's C{queue_info}: C{{key: {"free": n, "pending": n}}},
            after forgetting the keys unused for too long.
        """
        self.forget_unused()
        return {
            key: {"free": queue.free, "pending": queue.pending}
            for key, queue in self._queues.items()
        }

"""The tracker's pure scheduler: one priority queue of requests per device key.

No Twisted, no I/O. Each key has a heap of waiting requests ordered by
(-priority, arrival) and an insertion-ordered set of free servers handed out
oldest first. Every operation is O(log n) or O(1) amortised: withdrawn
requests are deleted lazily from the heap, which is rebuilt when the dead
entries outnumber the live ones.
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

    @property
    def free(self):
        """How many servers are free."""
        return len(self._free)

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


@attrs.define
class Scheduler:
    """
    Matches requests with free servers, per key.

    Keys stay listed in L{summary} once seen, as in TVM's tracker.
    """

    _queues: dict = attrs.field(factory=dict)
    _counter: "itertools.count" = attrs.field(factory=itertools.count)

    def _queue(self, key):
        """@return: the L{KeyQueue} of C{key}, created on first sight."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = KeyQueue()
        return queue

    def put(self, offer):
        """
        Offer a free server.

        @param offer: a new L{Offer}.
        @return: the L{Waiter} it was handed to at once, or L{None} if it is
            now queued as free.
        @raise ValueError: if C{offer} was used before.
        """
        if offer.status is not Status.NEW:
            raise ValueError(f"offer already {offer.status.value}")
        offer._seq = next(self._counter)
        queue = self._queue(offer.key)
        waiter = queue.pop_waiter()
        if waiter is None:
            offer.status = Status.QUEUED
            queue.push_offer(offer)
            return None
        _pair(waiter, offer)
        return waiter

    def request(self, waiter):
        """
        Ask for a server.

        @param waiter: a new L{Waiter}.
        @return: the L{Offer} it obtained at once, or L{None} if it now waits.
        @raise ValueError: if C{waiter} was used before.
        """
        if waiter.status is not Status.NEW:
            raise ValueError(f"waiter already {waiter.status.value}")
        waiter._seq = next(self._counter)
        queue = self._queue(waiter.key)
        offer = queue.pop_offer()
        if offer is None:
            waiter.status = Status.QUEUED
            queue.push_waiter(waiter)
            return None
        _pair(waiter, offer)
        return offer

    def withdraw(self, waiter):
        """
        Take back a waiting request.

        @return: whether it was waiting (false if already matched or gone).
        """
        if waiter.status is not Status.QUEUED:
            return False
        waiter.status = Status.WITHDRAWN
        self._queues[waiter.key].forget_waiter()
        return True

    def remove(self, offer):
        """
        Take back a free server.

        @return: whether it was free (false if already handed out or gone).
        """
        if offer.status is not Status.QUEUED:
            return False
        offer.status = Status.WITHDRAWN
        self._queues[offer.key].drop_offer(offer)
        return True

    def counts(self, key):
        """@return: C{(free, pending)} for C{key}; zeros for an unseen key."""
        queue = self._queues.get(key)
        if queue is None:
            return 0, 0
        return queue.free, queue.pending

    def summary(self):
        """@return: TVM's C{queue_info}: C{{key: {"free": n, "pending": n}}}."""
        return {
            key: {"free": queue.free, "pending": queue.pending}
            for key, queue in self._queues.items()
        }


def _pair(waiter, offer):
    """Mark a request and a server as matched with each other."""
    waiter.status = offer.status = Status.MATCHED

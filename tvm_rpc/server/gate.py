"""Which client keys a server accepts, and how many sessions it runs at once.

Sans-IO: L{SessionGate} knows the device key, the matchkey currently
offered to a tracker and the session slots. It never touches a socket or a
timer; the listener asks it whether a handshake key is welcome, the
registration loop asks it which matchkey to PUT, and both learn about changes
through plain callbacks.

The rules are TVM's (C{tvm/rpc/server.py}): without a tracker a client must
present C{client:<key>} exactly; with a tracker it must present the matchkey
the server last PUT, and a matchkey is good for one session only.
"""

from collections import deque

import attrs
from twisted.internet import defer

from ..protocol.keys import random_matchkey


class Slot:
    """
    One running session's hold on the gate; give it back with L{release}.
    """

    def __init__(self, gate):
        """@param gate: the L{SessionGate} that handed this slot out."""
        self._gate = gate
        self.released = False

    def release(self):
        """Free the slot (idempotent)."""
        if not self.released:
            self.released = True
            self._gate._released()


@attrs.define(eq=False)
class SessionGate:
    """
    The admission rules of one server.

    @ivar key: the device key given by C{--key}.
    @ivar tracked: whether the server registers with a tracker (then only
        the offered matchkey is accepted).
    @ivar max_sessions: how many sessions may run at once (TVM runs one).
    @ivar new_matchkey: makes a fresh matchkey from the key (injected so tests
        are deterministic).
    @ivar offer_changed: called with no argument whenever L{offered} changes
        to a new matchkey that should be PUT to the tracker.
    """

    key: str
    tracked: bool = False
    max_sessions: int = 1
    new_matchkey: object = random_matchkey
    offer_changed: object = None
    offered: "str | None" = attrs.field(init=False, default=None)
    active: int = attrs.field(init=False, default=0)
    _waiting: deque = attrs.field(init=False, factory=deque)

    @property
    def free(self):
        """Whether a session could start now."""
        return self.active < self.max_sessions

    def accepts(self, matchkey):
        """
        @param matchkey: what follows C{client:} in a handshake key.
        @return: whether a session may be opened with it (now or once a slot
            frees).
        """
        if not self.tracked:
            return matchkey == self.key
        return self.offered is not None and matchkey == self.offered

    def claim(self, matchkey):
        """
        Admit a handshake.

        @param matchkey: what follows C{client:} in the handshake key.
        @return: L{None} when the key does not match; else a L{Deferred} that
            fires with a L{Slot} once a session may run (at once when a slot
            is free). Cancelling it gives up the place in line.
        """
        if not self.accepts(matchkey):
            return None
        if self.tracked:
            # A tracker matchkey opens exactly one session.
            self.offered = None
        if self.free and not self._waiting:
            self.active += 1
            result = defer.succeed(Slot(self))
        else:
            result = defer.Deferred(self._waiting.remove)
            self._waiting.append(result)
        if self.tracked:
            self.renew()
        return result

    def renew(self):
        """
        Offer a fresh matchkey when a slot is free (a tracked gate only).

        @return: the matchkey now offered, or L{None} when none is.
        """
        if not self.tracked:
            return None
        if self.free and not self._waiting:
            self.offered = self.new_matchkey(self.key)
            if self.offer_changed is not None:
                self.offer_changed()
        else:
            self.offered = None
        return self.offered

    def current_offer(self):
        """
        @return: the matchkey to PUT now, making one if a slot is free and
            none is offered; L{None} when the server is busy or untracked.
        """
        if self.tracked and self.offered is None and self.free and not self._waiting:
            self.offered = self.new_matchkey(self.key)
        return self.offered

    def _released(self):
        self.active -= 1
        if self._waiting and self.free:
            self.active += 1
            self._waiting.popleft().callback(Slot(self))
            return
        if self.tracked and self.offered is None:
            self.renew()

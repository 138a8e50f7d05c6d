"""A leaner epoll reactor for session workers.

A session worker runs one connection (plus its lifeline) and, between calls,
usually has no timed call pending. Twisted's generic main loop still does, on
every turn, the bookkeeping of timed and thread calls
(C{runUntilCurrent}, C{timeout}) and wraps every readiness event in a
logging context (C{log.callWithLogger}) and an exception handler. For a
trivial remote call those layers cost a noticeable share of the round trip.

:class:`WorkerReactor` is an
:class:`~twisted.internet.epollreactor.EPollReactor` with the same semantics
and a shorter loop:

- the timed-call bookkeeping runs only when there is something for it to do
  (a thread call, a new or pending timed call, or a stop in progress);
- a read-only event goes straight to the selectable's C{doRead}; other
  events (writes, hang-ups, errors) take Twisted's own C{_doReadOrWrite};
- an exception raised by a selectable is logged and disconnects that
  selectable, as Twisted does; one escaping the loop itself is logged and the
  loop goes on.

Install it with :func:`install` before anything imports
``twisted.internet.reactor`` (the worker does so right after its fork).
"""

import errno

from twisted.internet import epollreactor
from twisted.logger import Logger

log = Logger()


class WorkerReactor(epollreactor.EPollReactor):
    """An L{EPollReactor} whose main loop skips work it does not need; see the module."""

    def _idle(self):
        """@return: whether no timed call, thread call or stop needs the bookkeeping."""
        return not (
            self.threadCallQueue
            or self._newTimedCalls
            or self._pendingTimedCalls
            or self._justStopped
        )

    def mainLoop(self):
        """Run until stopped: timed-call bookkeeping only when needed, then poll."""
        while self._started:
            try:
                while self._started:
                    if self._idle():
                        self.doPoll(None if self.running else 0)
                    else:
                        self.runUntilCurrent()
                        timeout = self.timeout()
                        self.doPoll(timeout if self.running else 0)
            except BaseException:
                # As Twisted's own loop does: log, and keep serving.
                log.failure("Unexpected error in main loop")
        log.info("Main loop terminated.")

    def doPoll(self, timeout):
        """Wait for events and dispatch them; plain reads take the short path."""
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event == self._POLL_IN:
                try:
                    why = selectable.doRead()
                except BaseException as e:
                    log.failure("error reading from {selectable}", selectable=selectable)
                    why = e
                if why:
                    self._disconnectSelectable(selectable, why, True)
            else:
                self._doReadOrWrite(selectable, fd, event)

    doIteration = doPoll


def install():
    """
    Install a L{WorkerReactor} as the global reactor.

    @return: the reactor.
    @raise twisted.internet.error.ReactorAlreadyInstalledError: when a
        reactor is installed already.
    """
    from twisted.internet.main import installReactor

    reactor = WorkerReactor()
    installReactor(reactor)
    return reactor

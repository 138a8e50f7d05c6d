"""A leaner epoll reactor for session workers.

A session worker runs one connection (plus its lifeline) and, between calls,
usually has no timed call pending. Twisted's generic main loop still does, on
every turn, the bookkeeping of timed and thread calls
(C{runUntilCurrent}, C{timeout}) and wraps every readiness event in a
logging context (C{log.callWithLogger}) and an exception handler. For a
trivial remote call those layers cost a noticeable share of the round trip.

L{WorkerReactor} is an
L{EPollReactor<twisted.internet.epollreactor.EPollReactor>} with the same semantics
and a shorter loop:

  - the timed-call bookkeeping runs only when there is something for it to do
    (a thread call, a new or pending timed call, or a stop in progress);
  - a read-only event goes straight to the selectable's C{doRead}; other
    events (writes, hang-ups, errors) take Twisted's own C{_doReadOrWrite};
  - an exception raised by a selectable is logged and disconnects that
    selectable, as Twisted does; one escaping the loop itself is logged and the
    loop goes on.

The loop reads the epoll reactor's private state, so it lives behind
L{tvm_rpc.twisted_fence} (L{lean_main_loop<tvm_rpc.twisted_fence.lean_main_loop>},
L{lean_do_poll<tvm_rpc.twisted_fence.lean_do_poll>}); when the installed
Twisted does not pass the fence's probe, L{worker_reactor_class} is Twisted's
own C{EPollReactor}.

Install it with L{install} before anything imports
C{twisted.internet.reactor} (the worker does so right after its fork).
"""

from twisted.internet import epollreactor

from .. import twisted_fence


class WorkerReactor(epollreactor.EPollReactor):
    """An L{EPollReactor} whose main loop skips work it does not need; see the module."""

    mainLoop = twisted_fence.lean_main_loop
    doPoll = doIteration = twisted_fence.lean_do_poll


def worker_reactor_class(lean=None):
    """
    @param lean: whether to use the lean loop; L{None} for the fence's
        verdict on the installed Twisted (L{twisted_fence.lean_reactor_ok}).
    @return: L{WorkerReactor}, or Twisted's C{EPollReactor} when the lean
        loop is off.
    """
    if lean is None:
        lean = twisted_fence.lean_reactor_ok
    return WorkerReactor if lean else epollreactor.EPollReactor


def install():
    """
    Install the session worker's reactor (see L{worker_reactor_class}) as
    the global reactor.

    @return: the reactor.
    @raise twisted.internet.error.ReactorAlreadyInstalledError: when a
        reactor is installed already.
    """
    from twisted.internet.main import installReactor

    reactor = worker_reactor_class()()
    installReactor(reactor)
    return reactor

"""
The fence around Twisted's internals: every read or write of a private
Twisted attribute in L{tvm_rpc} is in this module, and is checked once, at
import.

A few measured optimisations need what Twisted does not publish: whether a
TCP transport has bytes queued (write-through, the splice hand-over),
whether the reactor is reading a descriptor (eager reads), AMP's tag counter
and its StartTLS switch, and the epoll reactor's own loop state (the
session worker's lean reactor). For each, a probe runs at import on the
installed Twisted -- a real object driven through the behaviour we rely on
where that is cheap, the class attributes and the C{__init__} that sets them
otherwise. When a probe passes, the fast function is bound here once, so a
call costs exactly what it did before the fence; when it fails (an upgrade
renamed or changed the attribute), the public path is bound instead and one
log line says which optimisation is off and why. An upgrade may slow us,
never break us.

Fenced, with what each falls back to:

  - L{idle_socket} (C{FileDescriptor.dataBuffer}, C{offset}, C{_tempDataLen},
    C{_writeDisconnecting}, C{_writeDisconnected}; C{tcp.Connection.TLS}):
    write-through and eager reads; without it every write goes through the
    transport and no read is taken before the reactor's turn.
  - L{write_buffer_empty} (the same buffer fields): the proxy's splice
    hand-over; without it (L{None}) pairs relay through Twisted.
  - L{reactor_reading} (the reactor's C{_reads}): eager reads; without it the
    public C{getReaders()} answers.
  - L{next_tag} (C{AMP._nextTag}): the session's call tags; without it a
    counter of our own whose tags (C{t1}, C{t2}, ...) never look like AMP's
    hexadecimal ones.
  - L{amp_switching} (C{BinaryBoxProtocol._locked}, C{_startingTLSBuffer}):
    whether AMP is switching to TLS, when L{LeanAMP<tvm_rpc.lean_amp.LeanAMP>}
    must leave a box to AMP's own C{sendBox}; without it nothing is taken for a
    switch (no session protocol starts TLS).
  - L{mark_box_too_long} (C{BinaryBoxProtocol._keyLengthLimitExceeded}): makes
    outstanding commands fail with C{TooLong} as AMP does; without it they
    fail with the connection's end.
  - L{lean_main_loop}/L{lean_do_poll} (the epoll reactor's C{_started},
    C{_justStopped}, C{_newTimedCalls}, C{_pendingTimedCalls}, C{_poller},
    C{_selectables}, C{_POLL_IN}, C{_doReadOrWrite}, C{_disconnectSelectable}):
    the session worker's lean loop; without it (L{lean_reactor_ok} false) the
    worker runs Twisted's own C{EPollReactor}.
  - L{label_tls_port} (C{tcp.Port._type}): names a guarded TLS port "TLS" in
    Twisted's log lines, as C{listenSSL} does; without it they say "TCP".
"""

import dis
import inspect

import twisted
from twisted.internet import abstract, tcp
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

try:
    from twisted.internet import epollreactor
except ImportError:  # pragma: no cover - not Linux
    epollreactor = None

log = Logger("tvm_rpc.twisted_fence")

#: The name and the probe outcome (L{None} when it passed, else why not) of
#: every fenced optimisation, in the order they were decided.
decisions = {}


def decide(name, probe, fast, public):
    """
    Run C{probe}; pick C{fast} when it passes, else log once and pick C{public}.

    @param name: the optimisation, for the log line.
    @param probe: a callable returning L{None} when Twisted behaves as the
        fast path needs, or a sentence saying what is wrong. An exception it
        raises counts as a failure.
    @param fast: what the optimisation uses.
    @param public: its replacement on Twisted's public surface.
    @return: C{(chosen, passed)}.
    """
    try:
        problem = probe()
    except Exception as e:
        problem = f"the probe raised {e!r}"
    decisions[name] = problem
    if problem is None:
        return fast, True
    log.warn("Twisted {version}: {name} is off, using the public path instead ({problem})",
             version=twisted.__version__, name=name, problem=problem)
    return public, False


def stored_by_init(cls):
    """
    @return: the attribute names that C{cls} and its bases set on C{self} in
        their C{__init__} (read from the bytecode, nothing is run).
    """
    names = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        code = getattr(init, "__code__", None)
        if code is None:
            continue
        for instruction in dis.get_instructions(code):
            if instruction.opname == "STORE_ATTR":
                names.add(instruction.argval)
    return names


def _missing(cls, names):
    """@return: the C{names} that C{cls} neither has nor sets in C{__init__}."""
    stored = stored_by_init(cls)
    return [name for name in names if not hasattr(cls, name) and name not in stored]


# Write buffers of TCP transports: write-through, eager reads, splice hand-over.


class _ProbeReactor:
    """The reactor of L{_ProbeDescriptor}: it watches nothing."""

    def addReader(self, reader):
        """Ignore."""

    def removeReader(self, reader):
        """Ignore."""

    def addWriter(self, writer):
        """Ignore."""

    def removeWriter(self, writer):
        """Ignore."""


class _ProbeDescriptor(abstract.FileDescriptor):
    """A real L{abstract.FileDescriptor} whose C{writeSomeData} takes C{accept} bytes."""

    accept = 0

    def writeSomeData(self, data):
        """@return: how many bytes were taken (at most C{accept})."""
        return min(self.accept, len(data))


def _nothing_buffered(transport):
    """@return: whether a L{abstract.FileDescriptor} has no byte waiting to be written."""
    return not transport._tempDataLen and transport.offset == len(transport.dataBuffer)


def probe_write_buffer():
    """
    Drive a real L{abstract.FileDescriptor} through a write, a partial send,
    a full send and a half-close, checking the buffer fields at each step.

    @return: L{None}, or what did not behave.
    """
    if not issubclass(tcp.Connection, abstract.FileDescriptor):
        return "tcp.Connection is no longer a FileDescriptor"
    if getattr(tcp.Connection, "TLS", None) is not False:
        return "tcp.Connection.TLS is not False"
    descriptor = _ProbeDescriptor(_ProbeReactor())
    descriptor.connected = 1
    if not _nothing_buffered(descriptor) or descriptor._writeDisconnecting:
        return "a new FileDescriptor looks busy"
    descriptor.write(b"abc")
    if _nothing_buffered(descriptor) or descriptor._tempDataLen != 3:
        return "write() did not show in _tempDataLen"
    descriptor.accept = 1
    descriptor.doWrite()
    if len(descriptor.dataBuffer) - descriptor.offset != 2 or _nothing_buffered(descriptor):
        return "a partial send did not show in dataBuffer/offset"
    descriptor.accept = 10
    descriptor.doWrite()
    if not _nothing_buffered(descriptor):
        return "a full send left bytes in the buffer fields"
    descriptor.loseWriteConnection()
    if descriptor._writeDisconnecting is not True:
        return "loseWriteConnection() did not set _writeDisconnecting"
    descriptor.doWrite()
    if descriptor._writeDisconnected is not True:
        return "the half-close did not set _writeDisconnected"
    return None


def _idle_socket(transport):
    """
    Bytes sent on the socket this returns leave in the order they are
    written, exactly as if the transport had sent them, without waiting for
    the reactor's next turn.

    @param transport: a transport, or L{None}.
    @return: the socket of a plain TCP transport that has nothing waiting to
        be written, or L{None} (any other transport, or one closing or
        with bytes queued).
    """
    if not isinstance(transport, tcp.Connection):
        return None
    try:
        if (
            transport.connected
            and not transport.disconnecting
            and not transport.TLS
            and not transport._writeDisconnecting
            and not transport._writeDisconnected
            and not transport._tempDataLen
            and transport.offset == len(transport.dataBuffer)
        ):
            return transport.socket
    except AttributeError:
        return None
    return None


def _no_idle_socket(transport):
    """The public path: no socket is known to be idle; write through the transport."""
    return None


idle_socket, write_through_ok = decide(
    "write-through and eager reads", probe_write_buffer, _idle_socket, _no_idle_socket)

#: Whether a L{tcp.Connection} has written everything it was given, or
#: L{None} when that cannot be known (then nothing is spliced).
write_buffer_empty = _nothing_buffered if write_through_ok else None


# The reactor's read set: eager reads.


def probe_reactor_reads():
    """
    @return: L{None} when the descriptor-based reactors keep a C{_reads}
        collection that C{addReader} fills, or what is not so.
    """
    classes = []
    for module, name in (("epollreactor", "EPollReactor"), ("pollreactor", "PollReactor"),
                         ("selectreactor", "SelectReactor")):
        try:
            imported = __import__(f"twisted.internet.{module}", fromlist=[name])
        except ImportError:
            continue
        classes.append(getattr(imported, name))
    if not classes:
        return "no descriptor-based reactor to check"
    for cls in classes:
        if "_reads" not in stored_by_init(cls):
            return f"{cls.__name__}.__init__ no longer sets _reads"
        if "_reads" not in cls.addReader.__code__.co_names:
            return f"{cls.__name__}.addReader no longer uses _reads"
    return None


def _reactor_reading(transport):
    """
    @return: whether the reactor watches C{transport} for reading (not paused
        by a producer). Epoll and poll reactors keep descriptors, the select
        reactor selectables; unknown reactors give C{False}.
    """
    reads = getattr(getattr(transport, "reactor", None), "_reads", None)
    if reads is None:
        return False
    try:
        return transport.fileno() in reads or transport in reads
    except TypeError:
        return False


def _reactor_reading_public(transport):
    """The public path: ask C{IReactorFDSet.getReaders()}."""
    get_readers = getattr(getattr(transport, "reactor", None), "getReaders", None)
    if get_readers is None:
        return False
    return transport in get_readers()


reactor_reading, reactor_reads_ok = decide(
    "the reactor's read set", probe_reactor_reads, _reactor_reading, _reactor_reading_public)


# AMP: call tags, the StartTLS switch, an unparsable box.


def probe_amp_tags():
    """@return: L{None} when C{AMP._nextTag} gives new hexadecimal tags, or why not."""
    protocol = amp.AMP()
    first, second = protocol._nextTag(), protocol._nextTag()
    if not (isinstance(first, bytes) and isinstance(second, bytes)) or first == second:
        return f"_nextTag gave {first!r} then {second!r}"
    for tag in (first, second):
        int(tag, 16)
    return None


def _own_tag(protocol):
    """
    The public path: tags of our own, C{t1}, C{t2}, ... per protocol; AMP's
    own are hexadecimal, so the two never collide.
    """
    protocol.own_tags = count = getattr(protocol, "own_tags", 0) + 1
    return b"t%x" % count


#: C{next_tag(protocol)}: a new C{_ask} tag for a box C{protocol} sends.
next_tag, amp_tags_ok = decide(
    "AMP's tag counter", probe_amp_tags,
    getattr(amp.AMP, "_nextTag", None), _own_tag)


def probe_amp_switch():
    """@return: L{None} when AMP's StartTLS switch state is where C{sendBox} reads it."""
    cls = amp.BinaryBoxProtocol
    if getattr(cls, "_locked", None) is not False:
        return "BinaryBoxProtocol._locked is not False"
    if not hasattr(cls, "_startingTLSBuffer") or cls._startingTLSBuffer is not None:
        return "BinaryBoxProtocol._startingTLSBuffer is not None"
    names = cls.sendBox.__code__.co_names
    if "_locked" not in names or "_startingTLSBuffer" not in names:
        return "BinaryBoxProtocol.sendBox no longer reads them"
    return None


def _amp_switching(protocol):
    """@return: whether AMP is switching C{protocol} to TLS (its own C{sendBox} must send)."""
    return protocol._locked or protocol._startingTLSBuffer is not None


def _never_switching(protocol):
    """The public path: no switch is known of."""
    return False


amp_switching, amp_switch_ok = decide(
    "AMP's StartTLS check", probe_amp_switch, _amp_switching, _never_switching)


class _TooLongProbe(amp.AMP):
    """An AMP that keeps the reason its boxes stopped with."""

    stopped = None

    def stopReceivingBoxes(self, reason):
        """Remember C{reason}."""
        self.stopped = reason
        super().stopReceivingBoxes(reason)


def probe_box_too_long():
    """@return: L{None} when C{_keyLengthLimitExceeded} makes the connection's end C{TooLong}."""
    protocol = _TooLongProbe()
    if protocol._keyLengthLimitExceeded is not False:
        return "_keyLengthLimitExceeded is not False on a new protocol"
    protocol._keyLengthLimitExceeded = True
    amp.BinaryBoxProtocol.connectionLost(protocol, Failure(ConnectionDone()))
    if protocol.stopped is None or not protocol.stopped.check(amp.TooLong):
        return "the connection's end is not TooLong"
    return None


def _mark_box_too_long(protocol):
    """Make C{protocol}'s end fail its outstanding commands with C{TooLong}, as AMP does."""
    protocol._keyLengthLimitExceeded = True


def _leave_box_too_long(protocol):
    """The public path: outstanding commands fail with the connection's end."""


mark_box_too_long, box_too_long_ok = decide(
    "AMP's TooLong ending", probe_box_too_long, _mark_box_too_long, _leave_box_too_long)


# The epoll reactor's loop: the session worker's lean reactor.

#: What L{lean_main_loop} and L{lean_do_poll} read of the epoll reactor.
_REACTOR_STATE = ("threadCallQueue", "_newTimedCalls", "_pendingTimedCalls", "_justStopped",
                  "_started", "running", "_poller", "_selectables", "_POLL_IN")
_REACTOR_METHODS = {"_doReadOrWrite": ["selectable", "fd", "event"],
                    "_disconnectSelectable": ["selectable", "why", "isRead"],
                    "runUntilCurrent": [], "timeout": []}


def probe_epoll_reactor():
    """
    @return: L{None} when C{EPollReactor} keeps the state and methods the
        lean loop reads, with the signatures it calls them with, or why not.
    """
    if epollreactor is None:
        return "no epoll reactor on this platform"
    cls = epollreactor.EPollReactor
    missing = _missing(cls, _REACTOR_STATE)
    if missing:
        return f"EPollReactor lacks {', '.join(missing)}"
    if cls._POLL_IN != epollreactor.EPOLLIN:
        return "EPollReactor._POLL_IN is not EPOLLIN"
    for name, parameters in _REACTOR_METHODS.items():
        method = getattr(cls, name, None)
        if method is None:
            return f"EPollReactor lacks {name}"
        found = list(inspect.signature(method).parameters)[1:1 + len(parameters)]
        if found != parameters:
            return f"EPollReactor.{name} takes {found}, not {parameters}"
    return None


def lean_main_loop(reactor):
    """
    Run until stopped: Twisted's timed-call bookkeeping only when a thread
    call, a timed call or a stop needs it, then poll. An exception escaping
    an iteration is logged and the loop goes on, as in Twisted's own loop.
    (C{mainLoop} of the lean reactor.)
    """
    while reactor._started:
        try:
            while reactor._started:
                if not (reactor.threadCallQueue or reactor._newTimedCalls
                        or reactor._pendingTimedCalls or reactor._justStopped):
                    reactor.doPoll(None if reactor.running else 0)
                else:
                    reactor.runUntilCurrent()
                    timeout = reactor.timeout()
                    reactor.doPoll(timeout if reactor.running else 0)
        except BaseException:
            log.failure("Unexpected error in main loop")
    # Twisted says it at info; here it would end every session's worker log.
    log.debug("Main loop terminated.")


def lean_do_poll(reactor, timeout):
    """
    Wait for events and dispatch them: a plain read goes straight to the
    selectable's C{doRead}; other events take Twisted's C{_doReadOrWrite}.
    An exception from C{doRead} is logged and disconnects that selectable,
    as Twisted does. (C{doPoll} of the lean reactor.)
    """
    if timeout is None:
        timeout = -1
    try:
        events = reactor._poller.poll(timeout, len(reactor._selectables))
    except InterruptedError:
        return
    selectables = reactor._selectables
    poll_in = reactor._POLL_IN
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        if event == poll_in:
            try:
                why = selectable.doRead()
            except BaseException as e:
                log.failure("error reading from {selectable}", selectable=selectable)
                why = e
            if why:
                reactor._disconnectSelectable(selectable, why, True)
        else:
            reactor._doReadOrWrite(selectable, fd, event)


_, lean_reactor_ok = decide("the lean worker reactor", probe_epoll_reactor, True, False)


# Listening ports.


def probe_port_type():
    """@return: L{None} when C{tcp.Port._type} names the port in its log lines."""
    if getattr(tcp.Port, "_type", None) != "TCP":
        return "tcp.Port._type is not 'TCP'"
    if "_type" not in tcp.Port._logConnectionLostMsg.__code__.co_names:
        return "tcp.Port no longer logs its _type"
    return None


def _label_tls_port(port):
    """Name C{port} "TLS" in Twisted's log lines, as C{listenSSL} does."""
    port._type = "TLS"


def _leave_port_label(port):
    """The public path: the port keeps its "TCP" label."""


label_tls_port, port_label_ok = decide(
    "the TLS port label", probe_port_type, _label_tls_port, _leave_port_label)

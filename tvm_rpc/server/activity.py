"""What the server did: sessions by protocol and how they ended, worker
exits, refused handshakes.

Sans-IO counters fed by the listener, the proxy link and the session runners
(L{tvm_rpc.server.pool.WorkerPool}, L{tvm_rpc.server.listener.InProcessRunner}),
read by L{tvm_rpc.server.metrics.ServerCollector} at each scrape. They count
the facts of each session's end line (protocol, duration, bytes, how it
ended).
"""

from collections import Counter

import attrs

from ..daemon.histogram import Histogram

#: Upper bounds (seconds) of the session-duration histogram's buckets: a
#: refused or idle session lasts moments; a tuning run's sessions minutes to
#: hours.
DURATION_BUCKETS = (0.1, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 4 * 3600.0)

#: How a session ended, as labelled: C{closed} (its client closed it),
#: C{client_gone} (its client went away during a call), C{server_gone},
#: C{no_start} (no first message in time), C{timeout} (past its session
#: time), C{worker_crashed} (its worker died of a signal or an error).
SESSION_END_CAUSES = ("closed", "client_gone", "server_gone", "no_start", "timeout",
                      "worker_crashed")

#: How a session's worker process ended, as labelled: C{clean} (exit 0),
#: the watchdog's C{client_gone}, C{server_gone} and C{no_start} exits,
#: C{killed} (past its session time), C{signal}, C{error} (another exit code).
WORKER_EXIT_CAUSES = ("clean", "client_gone", "server_gone", "no_start", "killed", "signal",
                      "error")


@attrs.define(eq=False)
class ServerActivity:
    """
    The server's counters.

    @ivar started: sessions started, by protocol (C{tvm_rpc}, C{tvm}).
    @ivar ended: sessions ended, by C{(protocol, cause)} (a cause of
        L{SESSION_END_CAUSES}).
    @ivar received: bytes received from clients by ended sessions, by protocol.
    @ivar sent: bytes sent to clients by ended sessions, by protocol.
    @ivar worker_exits: session workers ended, by cause (L{WORKER_EXIT_CAUSES}).
    @ivar kept_worker_sessions: sessions run in a worker kept from the same
        client's previous session (no fork, no fresh process).
    @ivar refused: connections refused before a session, by reason.
    @ivar durations: ended sessions' seconds, a L{Histogram} per protocol.
    """

    started: Counter = attrs.field(factory=Counter)
    ended: Counter = attrs.field(factory=Counter)
    received: Counter = attrs.field(factory=Counter)
    sent: Counter = attrs.field(factory=Counter)
    worker_exits: Counter = attrs.field(factory=Counter)
    kept_worker_sessions: int = 0
    refused: Counter = attrs.field(factory=Counter)
    durations: dict = attrs.field(factory=dict)

    def refuse(self, reason):
        """A connection was refused before its session for C{reason} (a short name)."""
        self.refused[reason] += 1

    def session_started(self, protocol):
        """A session of C{protocol} was handed to its runner."""
        self.started[protocol] += 1

    def session_ended(self, protocol, cause, duration, counts):
        """
        A session ended.

        @param protocol: its protocol.
        @param cause: how, one of L{SESSION_END_CAUSES}.
        @param duration: seconds it ran.
        @param counts: C{(received, sent)} bytes of its connection, or
            L{None} when the platform does not tell.
        """
        self.ended[(protocol, cause)] += 1
        histogram = self.durations.get(protocol)
        if histogram is None:
            histogram = self.durations[protocol] = Histogram(DURATION_BUCKETS)
        histogram.observe(duration)
        if counts is not None:
            self.received[protocol] += counts[0]
            self.sent[protocol] += counts[1]

    def session_in_kept_worker(self):
        """A session started in a worker kept from its client's previous session."""
        self.kept_worker_sessions += 1

    def worker_exited(self, cause):
        """A session worker ended, for C{cause} (one of L{WORKER_EXIT_CAUSES})."""
        self.worker_exits[cause] += 1

    def active(self, protocol):
        """@return: sessions of C{protocol} started and not yet ended."""
        ended = sum(count for (p, _), count in self.ended.items() if p == protocol)
        return self.started[protocol] - ended

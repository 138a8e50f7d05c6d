"""
Progress of a request waiting in a tracker's queue: every C{period} seconds
one SUMMARY on the tracker session's control connection gives the number of
requests pending for the key, and the caller's C{progress} callable and a log
line hear it with the time waited so far, so a long wait is never silent.
"""

import attrs
from twisted.logger import Logger

#: Seconds between two progress reports of a waiting request.
PROGRESS_PERIOD = 10.0

log = Logger()


@attrs.frozen
class WaitProgress:
    """
    How a waiting request stands.

    @ivar key: the device key asked for.
    @ivar pending: the requests pending for C{key} at the tracker (this one
        included), or L{None} when the tracker did not say.
    @ivar waited: seconds waited so far.
    """

    key: str
    pending: "int | None"
    waited: float


def pending_of(summary, key):
    """
    @param summary: a tracker summary (C{queue_info} by key).
    @return: C{queue_info[key]["pending"]} as an L{int}, or L{None}.
    """
    try:
        return int(summary["queue_info"][key]["pending"])
    except (KeyError, TypeError, ValueError):
        return None


@attrs.define(eq=False)
class WaitReporter:
    """
    Reports a waiting request's progress until L{stop}: at most one SUMMARY
    per period (the next period starts once the tracker answered).

    @ivar tracker: the L{TrackerSession<tvm_rpc.client.tracker.TrackerSession>}
        (its C{reactor}, C{address} and C{summary()}).
    @ivar key: the device key asked for.
    @ivar progress: called with a L{WaitProgress}, or L{None}.
    @ivar period: seconds between reports.
    """

    tracker: object
    key: str
    progress: object = None
    period: float = PROGRESS_PERIOD
    _started: float = attrs.field(init=False, default=0.0)
    _call: object = attrs.field(init=False, default=None)
    _asking: object = attrs.field(init=False, default=None)
    _stopped: bool = attrs.field(init=False, default=False)

    def start(self):
        """Start counting; the first report comes after one period."""
        self._started = self.tracker.reactor.seconds()
        self._schedule()

    def stop(self):
        """The wait is over: no more reports."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self):
        if not self._stopped and self.period and self.period > 0:
            self._call = self.tracker.reactor.callLater(self.period, self._ask)

    def _ask(self):
        self._call = None
        asking = self.tracker.summary()
        asking.addCallbacks(pending_of, lambda failure: None, callbackArgs=(self.key,))
        asking.addCallback(self._report)

    def _report(self, pending):
        if self._stopped:
            return
        waited = self.tracker.reactor.seconds() - self._started
        where = "queue position unknown" if pending is None else f"{pending} pending"
        log.info("request({key!r}) waiting {waited:.0f} s at tracker {tracker} ({where})",
                 key=self.key, waited=waited, tracker=self.tracker.address, where=where)
        if self.progress is not None:
            try:
                self.progress(WaitProgress(self.key, pending, waited))
            except Exception:
                log.failure("the progress callback of request({key!r}) failed", key=self.key)
        self._schedule()

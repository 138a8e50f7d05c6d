"""Failure streaks of a tracker or proxy link: one line when one starts, one when it ends."""

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.client.reach_report import ReachReport
from tvm_rpc.client.registration import tracker_client_service

pytestmark = pytest.mark.unit


class Recorded:
    """A logger that keeps the text of each event."""

    def __init__(self):
        self.lines = []
        self.log = Logger(observer=self.observe)

    def observe(self, event):
        from twisted.logger import formatEvent

        self.lines.append(formatEvent(event))


class ScriptedEndpoint:
    """An endpoint that refuses while C{refusing} is true, else connects a protocol."""

    def __init__(self):
        self.refusing = True
        self.attempts = 0

    def connect(self, factory):
        self.attempts += 1
        if self.refusing:
            return defer.fail(ConnectionRefusedError(111, "Connection refused"))
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        return defer.succeed(protocol)


class ReachReportTests(SynchronousTestCase):
    def test_once_per_streak(self):
        recorded = Recorded()
        report = ReachReport("tracker 127.0.0.1:9190", recorded.log)
        report.reached()
        for delay in (0.5, 0.75, 1.125):
            report.failed(ConnectionRefusedError(111, "Connection refused"), delay)
        report.reached()
        report.reached()
        report.failed(ConnectionRefusedError(), 0.5)
        self.assertEqual(recorded.lines, [
            "cannot reach tracker 127.0.0.1:9190: connection refused; retrying in 0.5 s",
            "reached tracker 127.0.0.1:9190 again",
            "cannot reach tracker 127.0.0.1:9190: connection refused; retrying in 0.5 s",
        ])


class ReportingEndpointTests(SynchronousTestCase):
    def test_repr_names_the_peer(self):
        """Twisted's own retry lines print the endpoint: it names the tracker."""
        from tvm_rpc.client.reach_report import ReportingEndpoint

        self.assertEqual(repr(ReportingEndpoint(ScriptedEndpoint(), "tracker 127.0.0.1:9190")),
                         "<tracker 127.0.0.1:9190>")


class ClientServiceReportTests(SynchronousTestCase):
    def test_retries_report_once_and_name_the_tracker(self):
        """ClientService's retries go through the report; its endpoint's repr names the tracker."""
        recorded = Recorded()
        report = ReachReport("tracker 127.0.0.1:9190", recorded.log)
        clock = Clock()
        endpoint = ScriptedEndpoint()
        reached = []
        service = tracker_client_service(endpoint, clock, 5.0, reached.append, report)
        service.startService()
        for _ in range(5):
            clock.advance(6)
        self.assertGreater(endpoint.attempts, 2)
        # backoffPolicy adds jitter to the delay.
        self.assertEqual(len(recorded.lines), 1)
        self.assertRegex(recorded.lines[0], r"^cannot reach tracker 127\.0\.0\.1:9190: "
                                            r"connection refused; retrying in [0-9.]+ s$")
        endpoint.refusing = False
        for _ in range(10):
            if reached:
                break
            clock.advance(1)
        self.assertEqual(len(reached), 1)
        report.reached()
        self.assertEqual(recorded.lines[-1], "reached tracker 127.0.0.1:9190 again")
        service.stopService()

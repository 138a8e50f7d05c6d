"""The daemons' log under twistd: the operator's filter, rotation, and the hook twistd reads."""

import sys

import pytest
from twisted.application import service
from twisted.logger import ILogObserver, LogLevel, PredicateResult
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.daemon.logfile import LoggingRoot, make_observer, operator_filter, under_twistd
from tvm_rpc.tracker import tap as tracker_tap

pytestmark = pytest.mark.unit


def event(namespace, level=LogLevel.info):
    return {"log_namespace": namespace, "log_level": level, "log_format": "x"}


class FilterTests(SynchronousTestCase):
    """Twisted's own lines stay out below warnings; ours and twistd's start lines stay in."""

    def test_default(self):
        keep = operator_filter()
        self.assertEqual(keep(event("log_legacy")), PredicateResult.no)
        self.assertEqual(keep(event("twisted.internet.tcp.Port")), PredicateResult.no)
        self.assertEqual(keep(event("twisted.scripts._twistd_unix.UnixAppLogger")),
                         PredicateResult.maybe)
        self.assertEqual(keep(event("tvm_rpc.server.pool")), PredicateResult.maybe)
        self.assertEqual(keep(event("my_init_module")), PredicateResult.maybe)
        self.assertEqual(keep(event("tvm_rpc.server.pool", LogLevel.debug)), PredicateResult.no)
        self.assertEqual(keep(event("log_legacy", LogLevel.error)), PredicateResult.maybe)
        self.assertEqual(keep(event("twisted.internet", LogLevel.warn)), PredicateResult.maybe)

    def test_verbose(self):
        keep = operator_filter(verbose=True)
        for namespace in ("log_legacy", "twisted.internet.tcp.Port", "tvm_rpc"):
            self.assertEqual(keep(event(namespace, LogLevel.debug)), PredicateResult.maybe)


class RotationTests(SynchronousTestCase):
    def test_rotated_files_beyond_keep_are_deleted(self):
        import os
        import shutil
        import tempfile

        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "d.log")
        observer, log_file = make_observer(path, size=10, keep=2)
        for n in range(6):
            observer({"log_namespace": "tvm_rpc", "log_level": LogLevel.info,
                      "log_format": "line {n} is long enough", "n": n, "log_time": 0.0})
        log_file.close()
        self.assertEqual(sorted(os.listdir(folder)), ["d.log", "d.log.1", "d.log.2"])
        with open(path) as f:
            self.assertIn("line 5", f.read())


class UnderTwistdTests(SynchronousTestCase):
    """twistd gets the observer as the application's ILogObserver component."""

    def parse(self, *args):
        options = tracker_tap.Options()
        options.parseOptions(list(args))
        return options

    def test_not_under_twistd(self):
        options = self.parse()
        daemon = service.MultiService()
        self.assertIs(under_twistd(options, daemon), daemon)

    def test_syslog_left_to_twistd(self):
        options = self.parse()
        options.parent = {"syslog": True, "nodaemon": True}
        daemon = service.MultiService()
        self.assertIs(under_twistd(options, daemon), daemon)

    def test_component_set(self):
        options = self.parse("--verbose")
        options.parent = {"logfile": "-", "nodaemon": True}
        daemon = service.MultiService()
        root = under_twistd(options, daemon)
        self.assertIsInstance(root, LoggingRoot)
        self.assertEqual(list(root), [daemon])
        application = service.Application("rpc-tracker")
        root.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), root.observer)
        self.assertIn(root, list(service.IServiceCollection(application)))

    def test_stdout(self):
        observer, log_file = make_observer(sys.stdout)
        self.assertIsNone(log_file)
        self.assertTrue(ILogObserver.providedBy(observer))

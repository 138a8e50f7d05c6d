"""A private reactor for synchronous tests that drive a real daemon with our
client: turned by L{PrivateReactor.settle} until a Deferred fires (bounded in
time), never the global one."""

import time

from twisted.internet.selectreactor import SelectReactor


class PrivateReactor:
    """
    A mixin for a L{SynchronousTestCase} whose C{daemon} is the process under
    test: call L{start_private_reactor} in C{setUp}.
    """

    #: Seconds any one remote operation may take before the test fails.
    WAIT = 60.0

    def start_private_reactor(self):
        """Make C{self.reactor}, released when the test ends."""
        self.reactor = SelectReactor()
        self.addCleanup(self.release_reactor)

    def release_reactor(self):
        """Drop whatever the private reactor still watches, and its waker."""
        for selectable in self.reactor.removeAll():
            selectable.connectionLost(None)
        self.reactor.waker.connectionLost(None)

    def settle(self, deferred):
        """Turn the reactor until C{deferred} has a result (bounded by L{WAIT})."""
        done = []

        def note(result):
            done.append(True)
            return result

        deferred.addBoth(note)
        deadline = time.monotonic() + self.WAIT
        while not done:
            if time.monotonic() > deadline:
                self.fail(f"no result within {self.WAIT} s; daemon output:\n{self.daemon.output}")
            self.reactor.iterate(0.01)

    def resolve(self, deferred):
        """@return: the result of C{deferred} once it fires (fails the test on an error)."""
        self.settle(deferred)
        return self.successResultOf(deferred)

    def failure(self, deferred, *types):
        """@return: the failure of C{deferred} once it fires."""
        self.settle(deferred)
        return self.failureResultOf(deferred, *types)

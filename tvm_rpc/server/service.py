"""The server daemon as one MultiService: the listening port, the session runner
and, with a tracker, the registration loop."""

import errno
import shutil

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from .logs import logger

log = logger("tvm_rpc.server")
# The "listening on" line is what operators and tests wait for: it passes
# even with --silent.
_always = Logger("tvm_rpc.server")


def _in_use(error):
    socket_error = getattr(error, "socketError", None)
    return getattr(socket_error, "errno", None) == errno.EADDRINUSE


class RPCServerService(service.MultiService):
    """
    ``twistd rpc-server``: binds the server port, then registers with the
    tracker (when one is given) under the port actually bound.

    A failed bind raises from L{privilegedStartService}, so the daemon does
    not start without its port.
    """

    def __init__(
        self,
        reactor,
        factory,
        *,
        host="0.0.0.0",
        port=9090,
        port_end=9199,
        listen=(),
        make_registration=None,
        runner=None,
        work_root=None,
        owns_work_root=False,
    ):
        """
        @param reactor: provides L{IReactorTCP} (and what C{listen} needs).
        @param factory: the L{tvm_rpc.server.listener.ListenerFactory}.
        @param host: the interface to bind with TVM's flags.
        @param port: the first port to try.
        @param port_end: the end of the port range (exclusive).
        @param listen: endpoint strings to use instead of host and ports.
        @param make_registration: called with the bound port, returns the
            registration service to run as a child; L{None} without a tracker.
        @param runner: the session runner; its C{warm_up}/C{stop} are called
            when present.
        @param work_root: the directory under which sessions work.
        @param owns_work_root: whether to remove C{work_root} on stop.
        """
        super().__init__()
        self.reactor = reactor
        self.factory = factory
        self.host = host
        self.port = port
        self.port_end = port_end
        self.listen = list(listen)
        self.make_registration = make_registration
        self.runner = runner
        self.work_root = work_root
        self.owns_work_root = owns_work_root
        self.listening = []
        self.bound_port = None
        self.registration = None

    def privilegedStartService(self):
        """Bind the server port (so a privileged port works before dropping root)."""
        if not self.listening:
            self._bind()
        super().privilegedStartService()

    def startService(self):
        """Bind if not yet done, warm a worker, start registering."""
        if not self.listening:
            self._bind()
        if self.make_registration is not None and self.registration is None:
            if self.bound_port is None:
                raise CannotListenError(
                    None, None, "--tracker needs a TCP port to report, but no TCP port is bound"
                )
            self.registration = self.make_registration(self.bound_port)
            self.registration.setServiceParent(self)
        warm_up = getattr(self.runner, "warm_up", None)
        if warm_up is not None:
            warm_up()
        super().startService()

    def stopService(self):
        """Stop registering, stop listening, end every session, clean up."""
        stopped = super().stopService()
        stop = getattr(self.runner, "stop", None)
        if stop is not None:
            stop()
        for port in self.listening:
            port.stopListening()
        self.listening = []
        if self.owns_work_root and self.work_root:
            shutil.rmtree(self.work_root, ignore_errors=True)
        return stopped

    def _bind(self):
        if self.listen:
            for description in self.listen:
                endpoint = endpoints.serverFromString(self.reactor, description)
                outcome = []
                endpoint.listen(self.factory).addBoth(outcome.append)
                if not outcome:
                    raise CannotListenError(description, None, "listening did not complete at once")
                if isinstance(outcome[0], Failure):
                    outcome[0].raiseException()
                self._bound(outcome[0])
            return
        last = None
        for candidate in range(self.port, self.port_end):
            try:
                port = self.reactor.listenTCP(candidate, self.factory, backlog=128, interface=self.host)
            except CannotListenError as e:
                if _in_use(e):
                    last = e
                    continue
                raise
            self._bound(port)
            return
        raise CannotListenError(
            self.host, self.port, f"cannot bind to any port in [{self.port}, {self.port_end}): {last}"
        )

    def _bound(self, port):
        self.listening.append(port)
        address = port.getHost()
        host = getattr(address, "host", None)
        number = getattr(address, "port", None)
        if host is None or number is None:
            name = getattr(address, "name", address)
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            _always.info("rpc-server listening on unix:{name}", name=name)
            return
        if self.bound_port is None:
            self.bound_port = number
        _always.info("rpc-server listening on {host}:{port}", host=host, port=number)

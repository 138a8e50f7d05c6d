"""The server daemon as a MultiService: the session runner and either the
listening port (plus, with a tracker, the registration loop) or the link out
to a proxy (L{tvm_rpc.server.proxied.ProxiedServerService})."""

import shutil

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError


class SessionHostService(service.MultiService):
    """
    A service whose children bring connections to a session runner.

    It warms the runner before its children start, and on stop it ends every
    session and removes the work directory it owns.

    @ivar runner: the session runner; its C{warm_up}/C{stop} are called when
        present.
    @ivar work_root: the directory under which sessions work.
    @ivar owns_work_root: whether to remove C{work_root} on stop.
    """

    def __init__(self, runner=None, work_root=None, owns_work_root=False):
        """
        @param runner: the session runner.
        @param work_root: the directory under which sessions work.
        @param owns_work_root: whether to remove C{work_root} on stop.
        """
        super().__init__()
        self.runner = runner
        self.work_root = work_root
        self.owns_work_root = owns_work_root

    def startService(self):
        """Warm a worker, then start the children."""
        warm_up = getattr(self.runner, "warm_up", None)
        if warm_up is not None:
            warm_up()
        super().startService()

    def when_ready(self):
        """
        @return: a Deferred firing once the runner can start a session at
            once (its fork server is up); at once for runners without one.
        """
        when_ready = getattr(self.runner, "when_ready", None)
        return defer.succeed(None) if when_ready is None else when_ready()

    def add_when_ready(self, child):
        """
        Start C{child} (a service that offers this server to clients: a
        tracker registration, a proxy link) once the runner is ready, so the
        first client is not kept waiting while the fork server starts.
        """
        def add(_):
            if self.running and child.parent is None:
                child.setServiceParent(self)

        self.when_ready().addCallback(add)

    def stopService(self):
        """Stop the children, end every session, clean up."""
        stopped = super().stopService()
        stop = getattr(self.runner, "stop", None)
        if stop is not None:
            stop()
        if self.owns_work_root and self.work_root:
            shutil.rmtree(self.work_root, ignore_errors=True)
        return stopped


class RPCServerService(SessionHostService):
    """
    C{twistd rpc-server}: binds the server port (child C{"listener"}), then
    registers with the tracker (when one is given, child C{"registration"})
    under the port actually bound.

    A failed bind raises from L{privilegedStartService}, so the daemon does
    not start without its port.
    """

    def __init__(self, listener, factory, *, make_registration=None, runner=None,
                 work_root=None, owns_work_root=False):
        """
        @param listener: the L{tvm_rpc.daemon.listening.ListenerService} of the server port.
        @param factory: the L{tvm_rpc.server.listener.ListenerFactory}.
        @param make_registration: called with the bound port, returns the
            registration service to run as a child; L{None} without a tracker.
        @param runner: the session runner.
        @param work_root: the directory under which sessions work.
        @param owns_work_root: whether to remove C{work_root} on stop.
        """
        super().__init__(runner, work_root, owns_work_root)
        self.listener = listener
        self.factory = factory
        self.make_registration = make_registration
        self.registration = None
        listener.setName("listener")
        listener.setServiceParent(self)

    @property
    def bound_port(self):
        """The TCP port the server listens on, or L{None} (not yet bound, or UNIX only)."""
        return self.listener.port_number()

    def startService(self):
        """Bind if not yet done, start registering, warm a worker."""
        self.listener.bind()
        if self.make_registration is not None and self.registration is None:
            if self.bound_port is None:
                raise CannotListenError(
                    None, None, "--tracker needs a TCP port to report, but no TCP port is bound"
                )
            self.registration = self.make_registration(self.bound_port)
            self.registration.setName("registration")
        super().startService()
        if self.registration is not None:
            self.add_when_ready(self.registration)

"""The session worker's watchdog: the worker ends as soon as its session is over.

A worker's main thread may be inside a long call (user code, a kernel, TVM's
C++ server loop) when the session's reason to exist goes away. A thread that
only waits in C{poll} (without the GIL) watches for it and ends the process
at once, so the device is free again within moments instead of when the call
returns:

  - the client's end of the session socket closes (C{POLLRDHUP}: the client
    or its proxy went away);
  - the lifeline closes (the server died).

It never reads the socket, so the session's own reader loses nothing. The
server kills what the worker started (its process group) and removes its work
directory once it hears of the exit; when the server is gone, the watchdog
removes the work directory itself.

Before the session runs, L{wait_for_start} gives the client a bounded
time to send its first session message: a peer that completes the handshake
and then says nothing is dropped instead of holding the device.
"""

import _thread
import os
import select

from .workdir import remove_work_dirs_of

#: Exit code of a worker whose server went away.
EXIT_SERVER_GONE = 3
#: Exit code of a worker whose client went away.
EXIT_CLIENT_GONE = 4
#: Exit code of a worker whose client never started its session.
EXIT_NO_START = 5

#: What each exit code says, for the server's log.
EXIT_REASONS = {
    EXIT_SERVER_GONE: "the server went away",
    EXIT_CLIENT_GONE: "the client went away",
    EXIT_NO_START: "the client never started its session",
}

#: Each exit code's cause, as the server's metrics label it.
EXIT_CAUSES = {
    EXIT_SERVER_GONE: "server_gone",
    EXIT_CLIENT_GONE: "client_gone",
    EXIT_NO_START: "no_start",
}


class Watchdog:
    """
    Watches the lifeline for the worker's whole life, and the session socket
    while a session runs (L{arm}, L{disarm}): a worker kept for its
    client's next session must outlive the end of the previous one.
    """

    def __init__(self, lifeline_fd, work_root):
        """
        @param lifeline_fd: the lifeline's descriptor.
        @param work_root: where this worker makes its work directories.
        """
        self._lifeline = lifeline_fd
        self._work_root = work_root
        self._lock = _thread.allocate_lock()
        # The duplicate of the session socket being watched, and a count of
        # arm/disarm calls: an event on a socket no longer watched is ignored.
        self._watched = None
        self._generation = 0
        # Duplicates no longer watched, closed by the thread itself (once it
        # no longer polls them, so their numbers cannot be reused under it).
        self._retired = []
        self._wake_read, self._wake_write = os.pipe()

    def start(self):
        """Watch from a daemon thread; @return: this watchdog."""
        # _thread, not threading: Thread.start waits until the new thread
        # runs, which can cost a session's start milliseconds on a busy device.
        _thread.start_new_thread(self.watch, ())
        return self

    def arm(self, socket_fd):
        """
        End the worker when the client's end of C{socket_fd} closes.

        @param socket_fd: the session socket (the watchdog watches a
            duplicate of its own: the session may close or re-home the original).
        """
        self._switch(os.dup(socket_fd))

    def disarm(self):
        """Stop watching the session socket (its session ended cleanly)."""
        self._switch(None)

    def _switch(self, watched):
        with self._lock:
            if self._watched is not None:
                self._retired.append(self._watched)
            self._watched = watched
            self._generation += 1
        os.write(self._wake_write, b"!")

    def watch(self):
        """Wait for the end of the lifeline or of the watched socket; end the worker then."""
        while True:
            with self._lock:
                watched, generation = self._watched, self._generation
                retired, self._retired = self._retired, []
            for fd in retired:
                os.close(fd)
            poller = select.poll()
            poller.register(self._lifeline, select.POLLIN)
            poller.register(self._wake_read, select.POLLIN)
            if watched is not None:
                poller.register(watched, select.POLLRDHUP)
            for fd, _ in poller.poll():
                if fd == self._lifeline:
                    remove_work_dirs_of(self._work_root, os.getpid())
                    os._exit(EXIT_SERVER_GONE)
                if fd == self._wake_read:
                    os.read(self._wake_read, 4096)
                    continue
                with self._lock:
                    if self._generation == generation:
                        os._exit(EXIT_CLIENT_GONE)


def start(socket_fd, lifeline_fd, work_root):
    """
    Watch the session socket and the lifeline from a daemon thread, for a
    worker that serves one session.

    @param socket_fd: the session socket's descriptor.
    @param lifeline_fd: the lifeline's descriptor.
    @param work_root: where this worker made its work directory.
    @return: the L{Watchdog}.
    """
    watchdog = Watchdog(lifeline_fd, work_root)
    watchdog.arm(socket_fd)
    return watchdog.start()


def wait_for_start(socket_fd, timeout):
    """
    Wait until the client has sent something (or closed), at most C{timeout}
    seconds; end the worker with L{EXIT_NO_START} if it has not.

    Call it before anything reads the socket, so nothing can have been read
    already.

    @param timeout: seconds, or L{None} to wait without limit.
    """
    if timeout is None:
        return
    poller = select.poll()
    poller.register(socket_fd, select.POLLIN | select.POLLRDHUP)
    if not poller.poll(timeout * 1000):
        os._exit(EXIT_NO_START)

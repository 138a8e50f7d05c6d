"""Where the daemons' log goes under twistd, and what reaches it.

twistd builds its log observer after C{makeService}, unless the application
carries an L{ILogObserver} component: L{under_twistd} puts the daemon's
service under a L{LoggingRoot} that sets that component, so that

  - Twisted's own lines (a port starting, a factory starting, a connection
    made, a main loop ending; workers' too) are left out below warnings:
    an operator reads one line per session, not Twisted's internals
    (C{--verbose} lets them through, with our debug lines);
  - C{--logfile} is rotated by size (C{--log-size}) and only C{--log-keep}
    rotated files are kept (L{twisted.python.logfile.LogFile}'s
    C{maxRotatedFiles}; twistd's own keeps them all). SIGUSR1 still rotates,
    as with twistd.

L{LogFileOptions} holds the three flags; L{operator_filter} is the filter,
which the session workers apply to their own output too.
"""

import signal
import sys

from twisted.application import service
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    PredicateResult,
    textFileLogObserver,
)
from twisted.python import logfile

from .options import positive_int

#: twistd's rotation size (L{LogFile}'s default), bytes.
DEFAULT_LOG_SIZE = 1000000


class LogFileOptions:
    """Mixin for a daemon's L{usage.Options}: C{--verbose}, C{--log-size}, C{--log-keep}."""

    optFlags = [
        ["verbose", None, "Log Twisted's own lines too (ports, factories, connections) and "
                          "our debug lines (each session's start)."],
    ]
    optParameters = [
        ["log-size", None, DEFAULT_LOG_SIZE,
         "Rotate twistd's --logfile when it reaches this many bytes.", positive_int],
        ["log-keep", None, None,
         "Rotated log files to keep (FILE.1 to FILE.N); older ones are deleted "
         "(default: all, as twistd).", positive_int],
    ]


def operator_filter(verbose=False):
    """
    @param verbose: let everything through.
    @return: a predicate for L{FilteringLogObserver} that drops debug
        events, and Twisted's own events below warnings (and legacy
        C{log.msg} lines, which is how Twisted's internals log), keeping
        twistd's start-up lines.
    """

    def predicate(event):
        level = event.get("log_level", LogLevel.info)
        if verbose or level >= LogLevel.warn:
            return PredicateResult.maybe
        if level < LogLevel.info:
            return PredicateResult.no
        namespace = event.get("log_namespace") or ""
        if namespace == "log_legacy" or (
            namespace.startswith("twisted.") and not namespace.startswith("twisted.scripts.")
        ):
            return PredicateResult.no
        return PredicateResult.maybe

    return predicate


def _log_file(twistd):
    """
    @param twistd: twistd's own options.
    @return: the file twistd would write to (rotated as L{LogFileOptions}
        say), or L{None} when twistd logs elsewhere (syslog, a custom logger).
    """
    name = twistd.get("logfile") or ""
    if twistd.get("syslog") or twistd.get("logger"):
        return None
    if name == "-" or (not name and twistd.get("nodaemon")):
        return sys.stdout
    return name or "twistd.log"


def make_observer(target, verbose=False, size=DEFAULT_LOG_SIZE, keep=None):
    """
    @param target: L{sys.stdout} or a file name.
    @param verbose: see L{operator_filter}.
    @param size: rotate a file at this many bytes.
    @param keep: rotated files to keep (L{None}: all).
    @return: the filtered observer, and the L{LogFile} (L{None} for stdout).
    """
    log_file = None
    if target is sys.stdout:
        output = sys.stdout
    else:
        output = log_file = logfile.LogFile.fromFullPath(
            target, rotateLength=size, maxRotatedFiles=keep
        )
    observer = FilteringLogObserver(textFileLogObserver(output), [operator_filter(verbose)])
    return observer, log_file


class LoggingRoot(service.MultiService):
    """
    The service twistd gets: the daemon's own as its only child, and the log
    observer set on the application as it is added to it.
    """

    def __init__(self, child, observer):
        """
        @param child: the daemon's service.
        @param observer: the L{ILogObserver} for twistd.
        """
        super().__init__()
        self.observer = observer
        child.setServiceParent(self)

    def setServiceParent(self, parent):
        """Give twistd's application the observer, then join it."""
        set_component = getattr(parent, "setComponent", None)
        if set_component is not None:
            set_component(ILogObserver, self.observer)
        super().setServiceParent(parent)


def under_twistd(options, daemon):
    """
    @param options: the daemon's parsed options (with L{LogFileOptions}).
    @param daemon: the service C{makeService} built.
    @return: a L{LoggingRoot} over C{daemon} when twistd parsed C{options}
        and logs to stdout or a file; C{daemon} itself otherwise.
    """
    twistd = getattr(options, "parent", None)
    target = None if twistd is None else _log_file(twistd)
    if target is None:
        return daemon
    observer, log_file = make_observer(
        target, options["verbose"], options["log-size"], options["log-keep"]
    )
    usr1 = getattr(signal, "SIGUSR1", None)
    if log_file is not None and usr1 is not None and not signal.getsignal(usr1):
        # twistd's own handler is only installed with its own log file.
        def rotate(number, frame):
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)

        signal.signal(usr1, rotate)
    return LoggingRoot(daemon, observer)

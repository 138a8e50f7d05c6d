"""The daemons' C{--silent} switch.

L{logger} gives loggers that L{set_silent} quiets to warnings and worse;
L{unfiltered_logger} gives loggers for the few lines scripts wait for (such as
the listening address), which C{--silent} leaves alone.
"""

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)

_level = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_level])


def logger(namespace):
    """
    @param namespace: the logger's namespace.
    @return: a L{Logger} whose events pass the daemons' level filter
        (L{set_silent}).
    """
    return Logger(namespace, observer=_observer)


def unfiltered_logger(namespace):
    """
    @param namespace: the logger's namespace.
    @return: a L{Logger} that C{--silent} does not quiet, for the few lines
        scripts wait for (such as the listening address).
    """
    return Logger(namespace)


def set_silent(silent, verbose=False):
    """
    Let only warnings and worse through (C{--silent}), or everything from info
    up (from debug up with C{--verbose}), for the loggers made by L{logger}.

    @param silent: whether to be silent.
    @param verbose: whether to log debug lines too.
    """
    level = LogLevel.warn if silent else LogLevel.debug if verbose else LogLevel.info
    _level.setLogLevelForNamespace("", level)

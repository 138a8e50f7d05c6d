"""The server's loggers, with one switch for ``--silent``."""

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
    @return: a L{Logger} whose events pass the server's level filter.
    """
    return Logger(namespace, observer=_observer)


def set_silent(silent):
    """
    Let only warnings and worse through (C{--silent}), or everything from info up.

    @param silent: whether to be silent.
    """
    _level.setLogLevelForNamespace("", LogLevel.warn if silent else LogLevel.info)

"""The server's loggers: the daemons' shared C{--silent} switch
(L{tvm_rpc.daemon.logs}), under the names the server's modules import."""

from ..daemon.logs import logger, set_silent, unfiltered_logger

__all__ = ["logger", "set_silent", "unfiltered_logger"]

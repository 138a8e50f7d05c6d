"""What the device bundle runs: C{rpc-server} in the foreground, as C{twistd -n rpc-server} would.

It takes C{twistd rpc-server}'s options (TVM's C{--tracker}, C{--key},
C{--host}, C{--port}, ... and ours: L{tvm_rpc.server.tap.Options}), builds the
service with L{tvm_rpc.server.tap.makeService} and runs it on the global
reactor, logging to standard output, until a signal stops it: the counterpart
of C{python -m tvm.exec.rpc_server}. No Twisted plugin is involved, so it runs
from a zip.

The session workers are child processes started as C{python -m
tvm_rpc.server.worker}; when tvm_rpc is imported from a zip, the zip goes first
on the C{PYTHONPATH} the children inherit, so they import the same tvm_rpc and
dependencies (and not a site-packages copy) even when the server itself was
started with C{python -I}.
"""

import os
import sys

from ..daemon.logs import unfiltered_logger

log = unfiltered_logger("tvm_rpc.bundle")


def archive_path(package=None):
    """
    @param package: the module whose loader is asked (tvm_rpc by default).
    @return: the absolute path of the zip it was imported from, or L{None}
        when it was imported from a directory.
    """
    if package is None:
        package = sys.modules["tvm_rpc"]
    archive = getattr(package.__spec__.loader, "archive", None)
    return os.path.abspath(archive) if archive else None


def python_path_with(first, current):
    """
    @param first: the entry to put first.
    @param current: the present C{PYTHONPATH} value, or L{None}.
    @return: a C{PYTHONPATH} value with C{first} first and the rest kept
        (C{first} only once).
    """
    rest = [p for p in (current or "").split(os.pathsep) if p and p != first]
    return os.pathsep.join([first] + rest)


def main(argv=None, out=None):
    """
    Run C{rpc-server} in the foreground until the reactor stops.

    @param argv: the options (C{sys.argv[1:]} by default).
    @param out: where the log goes (standard output by default).
    @return: the exit status: 0 after a clean stop, 1 when the server could
        not start, 2 on bad options.
    """
    from twisted.application import app, service
    from twisted.logger import FilteringLogObserver, globalLogBeginner, textFileLogObserver
    from twisted.python import usage

    from ..daemon.logfile import operator_filter
    from ..server import tap
    from ..partial_tls import hide_partial_tls

    argv = sys.argv[1:] if argv is None else argv
    out = sys.stdout if out is None else out
    archive = archive_path()
    if archive is not None:
        os.environ["PYTHONPATH"] = python_path_with(archive, os.environ.get("PYTHONPATH"))
    options = tap.Options()
    # The class's synopsis is written for twistd, which prefixes its own usage line.
    options.synopsis = f"Usage: python3 {os.path.basename(archive or sys.argv[0])} [options]"
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print(f"{options}\nrpc-server: {e}", file=sys.stderr)
        return 2
    # The same filter as under twistd: no "ListenerFactory starting on" and
    # other Twisted internals below warnings unless --verbose.
    observer = FilteringLogObserver(textFileLogObserver(out), [operator_filter(options["verbose"])])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    if hide_partial_tls():
        log.warn("pyOpenSSL is installed here without service_identity, which Twisted's TLS "
                 "needs: TLS is off (for --listen ssl:..., pip install 'twisted[tls]')")
    from twisted.internet import reactor

    application = service.Application("rpc-server")
    try:
        tap.makeService(options, reactor).setServiceParent(application)
        app.startApplication(application, False)
    except Exception:
        log.failure("rpc-server could not start")
        return 1
    reactor.run()
    return 0

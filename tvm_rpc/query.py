"""The query tool: print a tracker's state as TVM's C{query_rpc_tracker} does.

Run as C{python -m tvm_rpc.query} or C{tvm-rpc-query}. Without options it
prints exactly what C{python -m tvm.exec.query_rpc_tracker} prints for the same
tracker (see L{tvm_rpc.client.summary_text.text_summary} for the two places
where TVM's counting is wrong and ours is not); C{--json} prints the raw
summary; C{--leases} prints who holds which server (our tracker's extra
C{leases} field). An unreachable tracker or a peer that is not a tracker gives
one line on stderr and exit status 1.
"""

import argparse
import datetime
import json
import os
import sys

from twisted.internet import defer, error
from twisted.python.failure import Failure

from .client.link_errors import connect_reason
from .client.summary_text import text_summary
from .client.tracker import NotATracker, TrackerHungUp, connect_tracker
from .protocol.tracker_commands import BadMessage, TrackerError

#: Where to look when neither options nor the environment say.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9190
#: Seconds allowed to connect and get an answer.
DEFAULT_TIMEOUT = 10.0

PROGRAM = "tvm-rpc-query"


def parse_args(argv=None, environ=None):
    """
    Parse the command line as TVM's query tool does, plus our options.

    C{--host} and C{--port} default to C{TVM_TRACKER_HOST} and
    C{TVM_TRACKER_PORT}, then to 127.0.0.1:9190; like TVM's tool, an empty
    host or port 0 also means "use the default".

    @param argv: the arguments (without the program name); C{sys.argv[1:]}
        when L{None}.
    @param environ: the environment; C{os.environ} when L{None}.
    @return: an L{argparse.Namespace} with C{host}, C{port}, C{json},
        C{leases} and C{timeout}.
    @raise SystemExit: (status 2) on bad arguments, after a usage message.
    """
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Show the state of an RPC tracker."
    )
    parser.add_argument("--host", type=str, default="",
                        help="the tracker's host (TVM_TRACKER_HOST, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None,
                        help="the tracker's port (TVM_TRACKER_PORT, else 9190)")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true",
                       help="print the raw summary as JSON")
    shown.add_argument("--leases", action="store_true",
                       help="print which client holds which server")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds to wait for the tracker (default %(default)s)")
    options = parser.parse_args(argv)
    if not options.host:
        options.host = environ.get("TVM_TRACKER_HOST", DEFAULT_HOST)
    if not options.port:
        raw = environ.get("TVM_TRACKER_PORT", str(DEFAULT_PORT))
        try:
            options.port = int(raw)
        except ValueError:
            parser.error(f"TVM_TRACKER_PORT is not a port number: {raw!r}")
    if not 0 < options.port < 65536:
        parser.error(f"port out of range: {options.port}")
    if not options.timeout > 0:
        parser.error(f"timeout must be positive: {options.timeout}")
    return options


def describe_failure(failure, timeout):
    """
    Say in a few words why talking to the tracker failed.

    @param failure: the L{Failure}.
    @param timeout: the timeout that was in force, in seconds.
    @return: a one-line L{str}.
    """
    value = failure.value
    if failure.check(defer.TimeoutError, error.TimeoutError):
        return f"no answer within {timeout:g} s"
    if failure.check(NotATracker) and not failure.check(TrackerHungUp):
        return "not an RPC tracker (it did not echo the tracker magic)"
    if failure.check(TrackerHungUp, error.ConnectionDone, error.ConnectionLost):
        # What rpc-server and rpc-proxy do with a tracker client on their port.
        return ("the connection closed before the tracker answered "
                "(is it a tracker's port? an RPC server or proxy closes tracker clients)")
    if failure.check(TrackerError, BadMessage):
        return f"bad answer from the tracker: {value}"
    if failure.check(error.ConnectError):
        return connect_reason(value)
    text = " ".join(str(value).split())
    return text or type(value).__name__


def _format_since(since):
    """A lease's start as UTC date and time; other values are shown as given."""
    if isinstance(since, (int, float)) and not isinstance(since, bool):
        moment = datetime.datetime.fromtimestamp(since, datetime.timezone.utc)
        return moment.strftime("%Y-%m-%d %H:%M:%S")
    return "" if since is None else str(since)


def _format_address(value):
    """An address as C{host:port}, from a list, a dict or a string."""
    if isinstance(value, (list, tuple)):
        return ":".join(str(part) for part in value if part is not None)
    if isinstance(value, dict):
        parts = [value.get("host"), value.get("port")]
        return ":".join(str(p) for p in parts if p is not None)
    return "" if value is None else str(value)


def _field(lease, *names):
    """The first of C{names} present in C{lease}."""
    for name in names:
        if name in lease:
            return lease[name]
    return None


def leases_table(summary):
    """
    Render the C{leases} field of our tracker's summary as a table.

    Each lease (a dict as our tracker lists it: C{client} C{[host, port]},
    C{user}, C{key}, C{priority}, C{since} in seconds since the epoch, and the
    server's C{host} and C{port}) becomes a row: who holds the server (with
    the user name it gave), the key, the request's priority, since when (UTC)
    and the server's address. A matchkey is never printed, even from a
    tracker that lists one: it is what lets a client into the server.

    @param summary: the dict a SUMMARY returns.
    @return: the table, ending with a newline, or L{None} when the tracker
        gives no C{leases} field (TVM's tracker does not track them).
    """
    leases = summary.get("leases")
    if leases is None:
        return None
    if isinstance(leases, dict):
        leases = list(leases.values())
    header = ("holder", "key", "priority", "since (UTC)", "server")
    rows = []
    for lease in leases:
        if not isinstance(lease, dict):
            continue
        server = _format_address(_field(lease, "server"))
        if not server and lease.get("host") is not None:
            server = _format_address([lease.get("host"), lease.get("port")])
        holder = _format_address(_field(lease, "client", "holder"))
        user = lease.get("user")
        if user:
            holder = f"{holder} ({user})" if holder else str(user)
        priority = lease.get("priority")
        rows.append((
            holder,
            str(lease.get("key", "")),
            "" if priority is None else f"{priority:g}" if isinstance(priority, float)
            else str(priority),
            _format_since(lease.get("since")),
            server,
        ))
    rows.sort(key=lambda row: (row[1], row[3], row[0]))
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    line = "-" * (sum(widths) + 2 * (len(widths) - 1)) + "\n"

    def render(cells):
        """One row, each cell padded to its column."""
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() + "\n"

    text = "Leases\n" + line + render(header) + line
    text += "".join(render(row) for row in rows)
    text += line
    if not rows:
        text += "no server is held\n"
    return text


async def query(reactor, options, stdout, stderr):
    """
    Ask the tracker for its summary and print it.

    @param reactor: the reactor to connect with.
    @param options: as returned by L{parse_args}.
    @param stdout: where the summary goes.
    @param stderr: where the one-line error goes.
    @return: the exit status: 0, or 1 when the tracker could not be queried.
    """
    address = f"{options.host}:{options.port}"
    session = None
    try:
        session = await connect_tracker(
            options.host, options.port, reactor=reactor,
            connect_timeout=options.timeout,
        )
        answer = session.summary()
        answer.addTimeout(options.timeout, reactor)
        summary = await answer
    except Exception:
        reason = describe_failure(Failure(), options.timeout)
        stderr.write(f"{PROGRAM}: cannot query tracker at {address}: {reason}\n")
        return 1
    finally:
        if session is not None:
            session.close()
    try:
        if options.json:
            output = json.dumps(summary, indent=2, sort_keys=True) + "\n"
        elif options.leases:
            table = leases_table(summary)
            if table is None:
                table = ("This tracker reports no leases "
                         "(TVM's tracker does not track who holds a server).\n")
            output = f"Tracker address {address}\n\n" + table
        else:
            # TVM prints the address line and the text with print(): each
            # gains one more newline.
            output = f"Tracker address {address}\n\n" + text_summary(summary) + "\n"
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        stderr.write(f"{PROGRAM}: tracker at {address} sent a summary "
                     f"that cannot be shown: {type(e).__name__}: {' '.join(str(e).split())}\n")
        return 1
    stdout.write(output)
    return 0


def main(argv=None):
    """
    The command-line entry point; exits with L{query}'s status.

    @param argv: the arguments (without the program name); C{sys.argv[1:]}
        when L{None}.
    """
    options = parse_args(argv)
    from twisted.internet.task import react

    def run(reactor):
        """Query the tracker with the running reactor."""
        def done(status):
            """Turn a failing status into the process's exit status."""
            if status:
                raise SystemExit(status)

        finished = defer.Deferred.fromCoroutine(
            query(reactor, options, sys.stdout, sys.stderr)
        )
        return finished.addCallback(done)

    react(run)


if __name__ == "__main__":
    main()

"""The command-line options the three daemons share.

They come in two groups:

  - option coercers (L{port_number}, L{positive_int}, L{positive_float},
    L{non_negative_float}) and
    the C{HOST:PORT} parser L{parse_address}.
  - L{ListenOptions}: the C{--host/--port/--port-end/--listen} flags (TVM's
    plus Twisted endpoint strings) and their validation, and C{-h} for
    C{--help} (TVM's tools take both); L{listen_parameters} gives the rows
    of the first three with a daemon's defaults.
"""

from twisted.internet import endpoints
from twisted.python import usage

from .listening import endpoint_kind


#: What a daemon given C{--listen ssl:...} without TLS support says to install.
TLS_INSTALL_HINT = (
    "install tvm_rpc with its [tls] extra (pip install '.[tls]' in a checkout, or "
    "'tvm_rpc-*.whl[tls]'), or pip install 'twisted[tls]' (pyOpenSSL, service_identity)"
)


def port_number(value):
    """@return: C{value} as a port number. @raise ValueError: if it is not one."""
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"{value} is not a port number")
    return number


def positive_int(value):
    """@return: C{value} as a positive int. @raise ValueError: if it is not one."""
    number = int(value)
    if number <= 0:
        raise ValueError(f"{value} is not a positive integer")
    return number


def positive_float(value):
    """
    @return: C{value} as a positive, finite float (seconds, mostly).
    @raise ValueError: if it is not one.
    """
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{value} is not a positive number")
    return number


def non_negative_float(value):
    """
    @return: C{value} as a finite float of at least 0 (seconds, 0 for none).
    @raise ValueError: if it is not one.
    """
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"{value} is not a number of seconds (0 or more)")
    return number


def parse_address(text, what="address"):
    """
    Parse C{HOST:PORT}; an IPv6 literal is given as C{[v6]:PORT} (or bare
    before the last colon).

    @param text: the address.
    @param what: what it is (such as C{--tracker}), for the error message.
    @return: C{(host, port)}.
    @raise ValueError: when C{text} is not of that form.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host:
        raise ValueError(f"{what} must be HOST:PORT, not {text!r}")
    try:
        return host, port_number(port)
    except ValueError:
        raise ValueError(f"{what} must be HOST:PORT, not {text!r}") from None


def listen_parameters(host, port, port_end=9199, host_help="Address to listen on."):
    """
    The C{optParameters} rows of TVM's listening flags, with a daemon's defaults.

    @param host: the default of C{--host}.
    @param port: the default of C{--port}.
    @param port_end: the default of C{--port-end} (exclusive).
    @param host_help: the help text of C{--host}.
    @return: rows for L{usage.Options.optParameters}.
    """
    return [
        ["host", None, host, host_help],
        ["port", None, port, "First port to try.", port_number],
        ["port-end", None, port_end, "End of the port range (exclusive).", port_number],
    ]


class ListenOptions:
    """
    Mixin for a daemon's L{usage.Options} (put it first among the bases):
    the repeatable C{--listen ENDPOINT} and the checks of the listening flags.
    The C{--host/--port/--port-end} rows come from L{listen_parameters}.
    It also gives C{-h} as the short form of C{--help}, as TVM's tools have.
    """

    # The same function under a one-letter name: usage.Options lists it as
    # "-h, --help".
    opt_h = usage.Options.opt_help

    def __init__(self):
        """Start with no C{--listen} endpoint."""
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description):
        """Listen on a Twisted endpoint string, e.g. tcp:9090:interface=127.0.0.1
        (repeatable; replaces --host/--port/--port-end)."""
        self["listen"].append(description)

    def check_listen(self, port_range=True):
        """
        Check the port range and every C{--listen} endpoint string.

        @param port_range: whether C{--port/--port-end} must be a range
            (not when the daemon connects out instead of listening).
        @raise usage.UsageError: on an empty port range or a bad endpoint.
        """
        if port_range and self["port-end"] <= self["port"]:
            raise usage.UsageError("--port-end must be greater than --port")
        check_endpoints(self["listen"], "--listen")


def check_endpoints(descriptions, flag):
    """
    Check server endpoint strings given on the command line.

    @param descriptions: the strings.
    @param flag: the option that gave them (C{"--http"}), for the message.
    @raise usage.UsageError: naming the first string that is not an endpoint,
        or the extra to install for an C{ssl:} one without TLS support.
    """
    for description in descriptions:
        try:
            endpoints.serverFromString(None, description)
        except ImportError as e:
            if endpoint_kind(description) != "ssl":
                raise usage.UsageError(f"bad {flag} {description!r}: {e}")
            raise usage.UsageError(
                f"{flag} {description!r} needs TLS support, which is not installed "
                f"({e}): {TLS_INSTALL_HINT}") from None
        except Exception as e:
            raise usage.UsageError(f"bad {flag} {description!r}: {e}")


class MetricsHttpOptions:
    """
    Mixin for the L{usage.Options} of a daemon whose C{--http} serves its
    Prometheus metrics only (the proxy's, the server's): the repeatable
    C{--http ENDPOINT}, off by default, checked by L{check_http}.
    """

    def __init__(self):
        """Start with no C{--http} endpoint."""
        super().__init__()
        self["http"] = []

    def opt_http(self, description):
        """Serve Prometheus metrics (/metrics) on a Twisted endpoint string, e.g.
        tcp:9181:interface=127.0.0.1 (repeatable; off by default)."""
        self["http"].append(description)

    def check_http(self):
        """@raise usage.UsageError: on a C{--http} string that is not an endpoint."""
        check_endpoints(self["http"], "--http")

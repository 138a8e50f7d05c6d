"""Twisted's TLS half installed, as the device bundle can meet it on a device.

Twisted imports pyOpenSSL wherever it is importable and then
C{service_identity} unconditionally, so an interpreter that sees pyOpenSSL
without C{service_identity} (Debian's C{python3-openssl} on a device whose
bundle is run with plain C{python3}, so that TVM's runtime is found) cannot
import C{twisted.internet.endpoints} at all: the server and its workers would
stop before they start. TLS cannot work there anyway; hiding pyOpenSSL lets
everything else run.
"""

import importlib.util
import sys


def hide_partial_tls(find_spec=importlib.util.find_spec, modules=sys.modules):
    """
    Make C{import OpenSSL} fail when pyOpenSSL is importable but
    C{service_identity} is not (and pyOpenSSL was not imported yet).
    Idempotent.

    @param find_spec: finds a top-level module without importing it.
    @param modules: the module cache (L{sys.modules}).
    @return: whether pyOpenSSL is hidden.
    """
    if "OpenSSL" in modules:
        return modules["OpenSSL"] is None
    if find_spec("OpenSSL") is None or find_spec("service_identity") is not None:
        return False
    # None in sys.modules makes the import raise ImportError, which Twisted
    # reads as "no TLS".
    modules["OpenSSL"] = None
    return True

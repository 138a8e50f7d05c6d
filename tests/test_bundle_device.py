"""The device bundle as a real process: built by ``python -m tvm_rpc.bundle``,
run by an interpreter that sees no site-packages at all (``python -I -S``: no
Twisted, no numpy, no TVM), it registers with our tracker and serves a real
session to our client, its worker importing everything from the bundle."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.daemons import ROOT, Daemon, child_env, our_tracker, wait_summary
from tests.test_interop_server import run_client
from tests.test_server_flags import TWISTED_INTERNALS

pytestmark = pytest.mark.system

#: The interpreter of a machine with nothing but Python: no site-packages,
#: no environment, no working directory on the path.
BARE_PYTHON = [sys.executable, "-I", "-S"]

#: A module uploaded into a session: reports what the worker imports, and from where.
PROBE = textwrap.dedent(
    '''
    import importlib.util
    import sys

    import twisted
    import tvm_rpc
    import zope.interface


    def probe():
        return {
            "twisted": twisted.__file__,
            "tvm_rpc": tvm_rpc.__file__,
            "zope.interface": zope.interface.__file__,
            "compiled_zope": "zope.interface._zope_interface_coptimizations" in sys.modules,
            "numpy": importlib.util.find_spec("numpy") is not None,
            "tvm": importlib.util.find_spec("tvm") is not None,
            "no_site": bool(sys.flags.no_site),
        }
    '''
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The bundle, built by its command line into a temporary directory."""
    target = tmp_path_factory.mktemp("bundle") / "tvm-rpc-server.pyz"
    completed = subprocess.run(
        [sys.executable, "-m", "tvm_rpc.bundle", "-o", str(target)],
        capture_output=True, timeout=120, env=child_env(), cwd=str(ROOT),
    )
    assert completed.returncode == 0, completed.stderr.decode()
    assert re.search(r"wrote .*tvm-rpc-server\.pyz", completed.stdout.decode())
    return target


def bare_environment():
    """@return: the environment of a bare machine: a C{PATH}, nothing else."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def test_the_bare_interpreter_has_nothing():
    """The interpreter the bundle is run with cannot import Twisted (so the test below proves something)."""
    completed = subprocess.run(
        BARE_PYTHON + ["-c", "import twisted"], capture_output=True, timeout=60,
        env=bare_environment(),
    )
    assert completed.returncode != 0
    assert b"No module named 'twisted'" in completed.stderr


def session_on_bundle(python, bundle, tmp_path, env, expect):
    """
    Run the bundle with TVM's flags under our tracker, wait for the lines
    C{expect}, and serve one session of our client uploading L{PROBE}.

    @param python: the interpreter's command line.
    @param env: the bundle's environment.
    @return: the stopped L{Daemon} and the client's report.
    """
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    with our_tracker() as (_, tracker_port):
        server = Daemon(
            python + [str(bundle), "--tracker", f"127.0.0.1:{tracker_port}",
                      "--key", "bundled", "--host", "127.0.0.1", "--port", "0"],
            env=env, cwd=str(elsewhere),
        )
        try:
            for pattern in expect:
                server.wait_for(pattern)
            wait_summary(tracker_port, lambda s: s["queue_info"].get("bundled", {}).get("free"))
            report = run_client("device", "127.0.0.1", tracker_port, "bundled", probe)
        finally:
            server.stop()
    return server, report


def test_serves_a_session_through_a_tracker(bundle, tmp_path):
    """TVM's flags register the bundle with our tracker; a session runs with the bundle's modules only."""
    server, report = session_on_bundle(
        BARE_PYTHON, bundle, tmp_path, bare_environment(),
        [r"rpc-server listening on 127\.0\.0\.1:\d+",
         r"serves tvm_rpc's clients only.*No module named 'tvm'"])
    assert report["ok"], report
    assert report["same"] and report["array_same"]
    assert report["workpath"].endswith("blob.bin")
    found = report["probe"]
    for module in ("twisted", "tvm_rpc", "zope.interface"):
        assert found[module].startswith(str(bundle) + os.sep), found
    assert found["compiled_zope"] is False
    assert found["numpy"] is False and found["tvm"] is False
    assert found["no_site"] is True
    assert server.proc.returncode == 0, server.output
    assert "Traceback" not in server.output
    # Logged as under twistd: "ListenerFactory starting on", "Starting factory" left out.
    for text in TWISTED_INTERNALS:
        assert text not in server.output, server.output


def test_a_system_pyopenssl_without_service_identity(bundle, tmp_path):
    """
    Run with plain Python (no -I, to see TVM's runtime) on a device whose
    system packages have pyOpenSSL but not service_identity, as Debian's
    python3-openssl: Twisted would fail importing its endpoints; the bundle
    and its worker hide pyOpenSSL, say that TLS is off, and serve.
    """
    system = tmp_path / "dist-packages"
    (system / "OpenSSL").mkdir(parents=True)
    # A stand-in with every name Twisted asks of pyOpenSSL: unless hidden, it
    # takes Twisted's TLS import on to a missing module (cryptography here,
    # service_identity on such a device) and the server down with it.
    anything = "def __getattr__(name):\n    return type(name, (Exception,), {})\n"
    for module in ("__init__", "SSL", "crypto", "_util"):
        (system / "OpenSSL" / f"{module}.py").write_text(anything)
    server, report = session_on_bundle(
        [sys.executable, "-S"], bundle, tmp_path, dict(bare_environment(), PYTHONPATH=str(system)),
        [r"pyOpenSSL is installed here without service_identity",
         r"rpc-server listening on 127\.0\.0\.1:\d+"])
    assert report["ok"], (report, server.output)
    assert "Traceback" not in server.output, server.output


def test_bad_options_exit_with_usage(bundle):
    """A bad flag ends the bundle with status 2 and the reason, as TVM's argparse does."""
    completed = subprocess.run(
        BARE_PYTHON + [str(bundle), "--port", "9000", "--port-end", "9000"],
        capture_output=True, timeout=60, env=bare_environment(),
    )
    assert completed.returncode == 2
    assert b"--port-end must be greater than --port" in completed.stderr

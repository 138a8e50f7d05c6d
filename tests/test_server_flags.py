"""TVM's rpc_server flags on a real ``twistd rpc-server``: ``--no-fork`` and ``--load-library``.

Each test starts real daemons on loopback and drives them with our client
(``tests/interop_client.py``) and TVM's (``tests/tvm_client.py``) in child
processes.
"""

import shutil
import subprocess

import pytest

from tests.daemons import Daemon, twistd
from tests.test_interop_server import our_server, run_client
from tests.test_interop_tvm_client import tvm_client

pytestmark = pytest.mark.system

INIT = ("--init", "tests.server_init_sample")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A tiny shared library built with the system's C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail("a C compiler (cc) is needed to build the --load-library test library")
    folder = tmp_path_factory.mktemp("library")
    source = folder / "answer.c"
    source.write_text("int tvm_rpc_test_answer(void) { return 42; }\n")
    path = folder / "libanswer.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(path), str(source)], check=True,
                   timeout=60)
    return str(path)


def both_clients(port, name, *args, tvm=None):
    """@return: the results of calling C{name} with our client and with TVM's."""
    ours = run_client("call", "127.0.0.1", port, "dev", name, *args)
    assert ours["ok"] is True, ours
    results = [ours["result"]]
    if tvm is not None:
        theirs = tvm_client("call", "direct", "127.0.0.1", port, "dev", name, *args)
        assert theirs["ok"] is True, theirs
        results.append(theirs["result"])
    return results


def test_no_fork_spawns_each_worker(tvm):
    """
    TVM's --no-fork: each session still runs in its own worker process, and
    that worker is a fresh interpreter (spawned with its own command line),
    not a fork of the fork server; for both session protocols.
    """
    daemon, port = our_server("--key", "dev", "--no-fork", *INIT)
    try:
        pids = both_clients(port, "test.pid", tvm=tvm)
        lines = both_clients(port, "test.cmdline", tvm=tvm)
    finally:
        daemon.stop()
    assert daemon.proc.pid not in pids and len(set(pids)) == 2, pids
    for line in lines:
        assert "tvm_rpc.server.worker --spare-fd" in line, line


def test_forked_workers_by_default():
    """Without --no-fork the worker is a fork: the fork server's command line."""
    daemon, port = our_server("--key", "dev", *INIT)
    try:
        [line] = both_clients(port, "test.cmdline")
    finally:
        daemon.stop()
    assert "tvm_rpc.server.worker --control-fd" in line, line


@pytest.mark.parametrize("mode", [(), ("--no-fork",), ("--in-process",)])
def test_load_library_in_every_session(tvm, library, mode):
    """--load-library maps the library into the process that serves each session."""
    daemon, port = our_server("--key", "dev", "--load-library", library, *mode, *INIT)
    try:
        results = both_clients(port, "test.mapped", library,
                               tvm=None if mode == ("--in-process",) else tvm)
    finally:
        daemon.stop()
    assert results and all(result is True for result in results), results


def test_missing_library_stops_the_server_at_start(tmp_path):
    """A --load-library file that is not there is named at start, before any session."""
    daemon = Daemon(twistd("rpc-server", "--listen", "tcp:0:interface=127.0.0.1",
                           "--load-library", str(tmp_path / "missing.so")))
    try:
        daemon.wait_for(r"cannot find library .*missing\.so", 60)
        assert daemon.proc.wait(60) != 0
    finally:
        daemon.stop()

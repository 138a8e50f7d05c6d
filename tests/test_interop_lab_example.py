"""``docs/examples/lab_measure.py`` measures a kernel on every device of a key, for real.

Our tracker with one of our servers and one of TVM's (``python -m
tvm.exec.rpc_server``) under one key; the example compiles a matmul with
apache-tvm, checks its result on each device against numpy and times it
there, all devices at once from one reactor, each in its own session
protocol.
"""

import re
import subprocess
import sys

import pytest

from tests.daemons import (
    ROOT,
    child_env,
    free_servers,
    our_rpc_server,
    our_tracker,
    tvm_rpc_server,
    wait_summary,
)

pytestmark = pytest.mark.system

KEY = "lab"
EXAMPLE = ROOT / "docs" / "examples" / "lab_measure.py"
DEVICE_LINE = re.compile(r"^\s+(\S+:\d+)\s+(\S+)\s+mean\s+([\d.]+) ms", re.M)


def run_example(tracker_port):
    """@return: the finished example process (output captured)."""
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "--tracker", f"127.0.0.1:{tracker_port}", "--key", KEY,
         "--size", "32", "--number", "2", "--repeat", "2"],
        env=child_env(), capture_output=True, text=True, timeout=120)


def test_every_device_of_the_key_is_measured(tvm):
    """
    Each free server of the key, ours and TVM's, gets one session; each
    reports positive timings and the protocol its server speaks.
    """
    with our_tracker() as (_, port), \
            our_rpc_server("--tracker", f"127.0.0.1:{port}", "--key", KEY, "--silent") \
            as (_, our_port), \
            tvm_rpc_server("--tracker", f"127.0.0.1:{port}", "--key", KEY) as (_, tvm_port):
        wait_summary(port, lambda s: free_servers(s, KEY) >= 2, timeout=60)
        finished = run_example(port)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "on 2 of 2 devices of 'lab'" in finished.stdout, finished.stdout
    devices = {int(address.rsplit(":", 1)[1]): (protocol, float(mean))
               for address, protocol, mean in DEVICE_LINE.findall(finished.stdout)}
    assert {port: protocol for port, (protocol, _) in devices.items()} == \
        {our_port: "tvm_rpc", tvm_port: "tvm"}
    assert all(mean > 0 for _, mean in devices.values())


def test_no_free_server_is_an_error(tvm):
    """A key without servers ends the example with a message and a failure status."""
    with our_tracker() as (_, port):
        finished = run_example(port)
    assert finished.returncode != 0
    assert "no free server for key 'lab'" in finished.stderr

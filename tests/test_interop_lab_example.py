"""``docs/examples/lab_measure.py`` measures a kernel on every device of a key, for real.

Our tracker and two of our servers under one key; the example compiles a
matmul with apache-tvm, checks its result on each device against numpy and
times it there, all devices at once from one reactor.
"""

import re
import subprocess
import sys

from tests.daemons import ROOT, child_env, free_servers, our_rpc_server, our_tracker, wait_summary

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
    """Each free server of the key gets one session; each reports positive timings."""
    with our_tracker() as (_, port), \
            our_rpc_server("--tracker", f"127.0.0.1:{port}", "--key", KEY, "--silent") \
            as (_, first_port), \
            our_rpc_server("--tracker", f"127.0.0.1:{port}", "--key", KEY, "--silent") \
            as (_, second_port):
        wait_summary(port, lambda s: free_servers(s, KEY) >= 2, timeout=60)
        finished = run_example(port)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "on 2 of 2 devices of 'lab'" in finished.stdout, finished.stdout
    devices = DEVICE_LINE.findall(finished.stdout)
    assert sorted(int(address.rsplit(":", 1)[1]) for address, _, _ in devices) == \
        sorted([first_port, second_port])
    assert all(protocol == "tvm_rpc" and float(mean) > 0 for _, protocol, mean in devices)


def test_no_free_server_is_an_error(tvm):
    """A key without servers ends the example with a message and a failure status."""
    with our_tracker() as (_, port):
        finished = run_example(port)
    assert finished.returncode != 0
    assert "no free server for key 'lab'" in finished.stderr

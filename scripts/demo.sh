#!/usr/bin/env bash
# The main job end to end on loopback, on a fresh machine with only Python:
# builds a virtual environment (.venv-demo, reused when present; override with
# TVM_RPC_DEMO_VENV), installs the project with apache-tvm, starts our tracker,
# our proxy in tracker mode, two of our servers under the key "demo" (one
# listening, one reachable only through the proxy) and one of TVM's servers,
# prints the queue table with our query tool and with TVM's, then runs the TVM
# docs' story with our Deferred client: compile a dense + ReLU layer on the
# host, request both "demo" devices, upload, load, run, compare with numpy and
# time on the device; finally it shuts everything down. Every daemon runs in its own process group and the whole group is
# stopped on exit, error or interrupt, so nothing is left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
python="${PYTHON:-python3}"
venv="${TVM_RPC_DEMO_VENV:-.venv-demo}"
key=demo

say() { printf '\n== %s\n' "$*"; }

say "virtual environment $venv"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
venv="$(cd "$venv" && pwd)"
py="$venv/bin/python"
# A regular (not editable) install: a default editable install hides the
# twistd plugins of this flat layout (see STYLE.md).
"$py" -m pip install -q --disable-pip-version-check "$repo[tvm]"

work="$(mktemp -d "${TMPDIR:-/tmp}/tvm-rpc-demo.XXXXXX")"
# Job control puts each background daemon in a process group of its own, so
# stopping a group also stops the children TVM's daemons fork.
set -m
groups=()

stop_all() {
    local status=$?
    trap - EXIT INT TERM
    # Without job control bash does not report each stopped daemon as a job.
    set +em
    for pgid in "${groups[@]}"; do
        kill -TERM -- "-$pgid" 2>/dev/null
    done
    for pgid in "${groups[@]}"; do
        for _ in $(seq 50); do
            kill -0 -- "-$pgid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$pgid" 2>/dev/null
    done
    wait 2>/dev/null
    local left=0
    for pgid in "${groups[@]}"; do
        if kill -0 -- "-$pgid" 2>/dev/null; then left=1; fi
    done
    if [ "$status" -ne 0 ]; then
        echo "demo failed (status $status); daemon logs:" >&2
        tail -n 20 "$work"/*.log >&2 2>/dev/null
    fi
    rm -rf "$work"
    if [ "$left" -ne 0 ]; then
        echo "some daemons did not stop" >&2
        exit 1
    fi
    echo "all daemons stopped"
    exit "$status"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Start a daemon in the background, in its own process group, logging to
# $work/<name>.log.
start() {
    local name=$1
    shift
    (cd "$work" && exec "$@") >"$work/$name.log" 2>&1 &
    groups+=("$!")
}

# Wait until a daemon's log matches a pattern.
wait_log() {
    local name=$1 pattern=$2
    for _ in $(seq 300); do
        grep -q -- "$pattern" "$work/$name.log" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$name did not log '$pattern' within 30 s" >&2
    return 1
}

# How many servers are free under a key, by our query tool's --json.
free_servers() {
    "$py" -m tvm_rpc.query --host 127.0.0.1 --port "$tracker_port" --json |
        "$py" -c 'import json, sys; q = json.load(sys.stdin)["queue_info"]; print(q.get(sys.argv[1], {}).get("free", 0))' "$1"
}

# Wait until a key has N free servers.
wait_free() {
    local k=$1 n=$2
    for _ in $(seq 300); do
        [ "$(free_servers "$k")" = "$n" ] && return 0
        sleep 0.1
    done
    echo "$n servers under '$k' did not register within 30 s" >&2
    return 1
}

tracker_port="$(free_port)"
say "our tracker: twistd -n rpc-tracker on 127.0.0.1:$tracker_port"
start tracker "$venv/bin/twistd" -n --pidfile= --logfile=- rpc-tracker \
    --host 127.0.0.1 --port "$tracker_port" --port-end "$((tracker_port + 1))"
wait_log tracker "rpc-tracker listening on"
grep "rpc-tracker listening on" "$work/tracker.log"

proxy_port="$(free_port)"
say "our proxy in tracker mode: twistd -n rpc-proxy on 127.0.0.1:$proxy_port"
start proxy "$venv/bin/twistd" -n --pidfile= --logfile=- rpc-proxy \
    --host 127.0.0.1 --port "$proxy_port" --port-end "$((proxy_port + 1))" \
    --tracker "127.0.0.1:$tracker_port" --web-port 0
wait_log proxy "rpc-proxy listening on"

port="$(free_port)"
say "our rpc-server #1 on 127.0.0.1:$port, key '$key', registering with the tracker"
start server1 "$venv/bin/twistd" -n --pidfile= --logfile=- rpc-server \
    --host 127.0.0.1 --port "$port" --port-end "$((port + 1))" \
    --tracker "127.0.0.1:$tracker_port" --key "$key"
wait_log server1 "rpc-server listening on"

say "our rpc-server #2, key '$key', behind the proxy (--through-proxy: no listening port)"
start server2 "$venv/bin/twistd" -n --pidfile= --logfile=- rpc-server \
    --through-proxy --host 127.0.0.1 --port "$proxy_port" --key "$key"

port="$(free_port)"
say "TVM's own rpc_server on 127.0.0.1:$port, key 'tvm-$key', registering with our tracker"
start tvmserver "$py" -m tvm.exec.rpc_server --tracker "127.0.0.1:$tracker_port" \
    --key "tvm-$key" --host 127.0.0.1 --port "$port" --port-end "$((port + 1))"

wait_free "$key" 2
wait_free "tvm-$key" 1

say "our query tool: python -m tvm_rpc.query"
"$py" -m tvm_rpc.query --host 127.0.0.1 --port "$tracker_port"

say "TVM's query tool: python -m tvm.exec.query_rpc_tracker"
(cd "$work" && "$py" -m tvm.exec.query_rpc_tracker --host 127.0.0.1 --port "$tracker_port" 2>/dev/null)

say "the TVM docs' story with our Deferred client, on both '$key' devices at once"
(cd "$work" && "$py" - "$tracker_port" "$key") <<'EOF'
import sys

import numpy as np
import tvm
from tvm import te
from twisted.internet import defer, task

from tvm_rpc.client import connect_tracker

N, M = 64, 32


def compile_dense_relu(path):
    """Compile a dense + ReLU layer for the host CPU (what the boards run here)."""
    x = te.placeholder((1, N), "float32", name="x")
    w = te.placeholder((M, N), "float32", name="w")
    k = te.reduce_axis((0, N), name="k")
    dense = te.compute((1, M), lambda i, j: te.sum(x[i, k] * w[j, k], axis=k), name="dense")
    relu = te.compute(
        (1, M), lambda i, j: te.max(dense[i, j], tvm.tirx.const(0, "float32")), name="relu"
    )
    func = te.create_prim_func([x, w, relu]).with_attr("global_symbol", "dense_relu")
    tvm.compile(func, target="llvm").export_library(path)


async def run_on_device(tracker, key, x_host, w_host):
    session = await tracker.request(key, priority=1, session_timeout=60)
    async with session:
        await session.upload("dense_relu.so")
        module = await session.load_module("dense_relu.so")
        dev = session.cpu(0)
        x = await session.array(x_host, dev)
        w = await session.array(w_host, dev)
        y = await session.empty((1, M), "float32", dev)
        dense_relu = module["dense_relu"]
        await dense_relu(x, w, y)
        y_host = await y.numpy()
        np.testing.assert_allclose(y_host, np.maximum(x_host @ w_host.T, 0), rtol=1e-5)
        timing = await session.time_evaluator(dense_relu, dev, number=100, repeat=3)(x, w, y)
        return timing


async def main(reactor, port, key):
    compile_dense_relu("dense_relu.so")
    print(f"compiled dense({N}->{M}) + ReLU for llvm: dense_relu.so")
    tracker = await connect_tracker("127.0.0.1", port, reactor=reactor)
    try:
        rng = np.random.default_rng(0)
        x_host = rng.standard_normal((1, N)).astype("float32")
        w_host = rng.standard_normal((M, N)).astype("float32")
        timings = await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(run_on_device(tracker, key, x_host, w_host))
                for _ in range(2)
            ],
            consumeErrors=True,
        )
        for n, timing in enumerate(timings, 1):
            print(
                f"device {n}: output matches numpy; on-device time "
                f"mean {timing.mean * 1e6:.1f} us, min {timing.min * 1e6:.1f} us "
                f"over {len(timing.results)} repeats"
            )
        # Each server registers again with a fresh matchkey once its session ends.
        for _ in range(100):
            summary = await tracker.summary()
            if summary["queue_info"].get(key, {}).get("free") == 2:
                break
            await task.deferLater(reactor, 0.1)
        print("the queue once both servers registered again:")
        print(await tracker.text_summary())
    finally:
        await tracker.close()


task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, int(sys.argv[1]), sys.argv[2])))
EOF

say "shutting down"

#!/usr/bin/env bash
# The main job end to end on loopback, on a fresh machine with only Python:
# builds a virtual environment (.venv-demo, reused when present; override with
# TVM_RPC_DEMO_VENV), installs the project with apache-tvm, starts our tracker
# (twistd rpc-tracker) on a free port, registers two of TVM's own RPC servers
# with it under the key "demo", prints the queue table with our query tool and
# with TVM's, obtains a server with our Deferred client, and shuts everything
# down. Every daemon runs in its own process group and the whole group is
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

free_servers() {
    "$py" -m tvm_rpc.query --host 127.0.0.1 --port "$tracker_port" --json |
        "$py" -c 'import json, sys; q = json.load(sys.stdin)["queue_info"]; print(q.get(sys.argv[1], {}).get("free", 0))' "$key"
}

tracker_port="$(free_port)"
say "our tracker: twistd -n rpc-tracker on 127.0.0.1:$tracker_port"
start tracker "$venv/bin/twistd" -n --pidfile= --logfile=- rpc-tracker \
    --host 127.0.0.1 --port "$tracker_port" --port-end "$((tracker_port + 1))"
wait_log tracker "rpc-tracker listening on"
grep "rpc-tracker listening on" "$work/tracker.log"

for n in 1 2; do
    port="$(free_port)"
    say "TVM's rpc_server #$n on 127.0.0.1:$port, key '$key', registering with our tracker"
    start "server$n" "$py" -m tvm.exec.rpc_server --tracker "127.0.0.1:$tracker_port" \
        --key "$key" --host 127.0.0.1 --port "$port" --port-end "$((port + 1))"
done
for _ in $(seq 300); do
    [ "$(free_servers)" = 2 ] && break
    sleep 0.1
done
[ "$(free_servers)" = 2 ] || { echo "the two servers did not register within 30 s" >&2; exit 1; }

say "our query tool: python -m tvm_rpc.query"
"$py" -m tvm_rpc.query --host 127.0.0.1 --port "$tracker_port"

say "TVM's query tool: python -m tvm.exec.query_rpc_tracker"
(cd "$work" && "$py" -m tvm.exec.query_rpc_tracker --host 127.0.0.1 --port "$tracker_port" 2>/dev/null)

say "a server obtained with our Deferred client (connect_tracker(...).allocate('$key'))"
"$py" - "$tracker_port" "$key" <<'EOF'
import sys

from twisted.internet import defer, task

from tvm_rpc.client import connect_tracker


async def main(reactor, port, key):
    tracker = await connect_tracker("127.0.0.1", port, reactor=reactor)
    try:
        allocation = await tracker.allocate(key, priority=1, timeout=30)
        print(f"obtained {allocation.host}:{allocation.port} with matchkey {allocation.matchkey}")
        print("the queue now (one server handed out):")
        print(await tracker.text_summary())
    finally:
        tracker.close()


task.react(lambda reactor: defer.ensureDeferred(main(reactor, int(sys.argv[1]), sys.argv[2])))
EOF

say "who holds what: python -m tvm_rpc.query --leases"
"$py" -m tvm_rpc.query --host 127.0.0.1 --port "$tracker_port" --leases

say "shutting down"

"""Relay throughput and memory of our proxy against TVM's, in the same run.

Usage (from the repository root, with apache-tvm installed)::

    python bench/proxy_relay.py [--size-mib 256] [--slow-mib 1024] [--tvm-slow-mib 256]
                                [--rounds 5] [--pairs 4] [--slow-rate 100] [--write-docs]

For each path -- a direct loopback socket (the baseline), ``twistd rpc-proxy``
with its default kernel relay (``splice(2)``), ``twistd rpc-proxy --no-splice``
(the relay through Twisted) and TVM's ``python -m tvm.exec.rpc_proxy`` (web
port off) -- it moves
``--size-mib`` MiB from the client to the server and then the same back, and
prints the median MB/s per direction over ``--rounds`` rounds, each ratio
taken within a round (every round measures every path once, in turn), and for
the proxies the CPU seconds their process group spent per GiB relayed; then
the aggregate MB/s of ``--pairs`` pairs relaying at once (half of
``--size-mib`` each, client to server), also once per round. Another row,
``copyloop``, relays through a minimal blocking copy loop (one process per
direction, 1 MiB buffer), and ``spliceloop`` through a minimal blocking
``splice(2)`` loop (one process per direction, 1 MiB pipe): references for
what a bare relay hop costs on the machine, with and without copying the
bytes through user space. Then, with a reader
that takes at most ``--slow-rate`` MB/s while the writer sends as fast as it
can, it samples each proxy's resident memory (the whole process group) and
prints the peak growth over the idle proxy, and the growth left two seconds
after the pair closed. ``--write-docs`` puts the figures in the ``## Proxy``
section of ``docs/benchmarks.md`` (other sections are left alone).
"""

import argparse
import contextlib
import itertools
import os
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench.common import tree_cpu_seconds, tree_rss  # noqa: E402
from daemons import our_proxy, tvm_proxy  # noqa: E402
from tvm_rpc.protocol.constants import RPC_CODE_SUCCESS  # noqa: E402
from tvm_rpc.protocol.handshake import encode_handshake, encode_reply  # noqa: E402

MiB = 1024 * 1024
BLOCK = os.urandom(4 * MiB)


def recv_exactly(sock, size):
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return bytes(data)


def direct_pair():
    """A connected pair of loopback sockets: C{(client, server, closer)}."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


def _copy_loop(source, sink):
    """Relay one direction with a plain blocking loop (the reference relay)."""
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    while True:
        n = source.recv_into(view)
        if not n:
            sink.shutdown(socket.SHUT_WR)
            return
        sink.sendall(view[:n])


def _splice_loop(source, sink):
    """Relay one direction with a blocking splice loop through a 1 MiB pipe."""
    import fcntl

    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), MiB)
    while True:
        n = os.splice(source.fileno(), write_fd, MiB)
        if not n:
            sink.shutdown(socket.SHUT_WR)
            return
        while n:
            n -= os.splice(read_fd, sink.fileno(), n)


def reference_relay_pair(loop=_copy_loop):
    """
    A pair relayed by a minimal blocking C{loop}, one process per direction:
    what a bare relay hop costs on this machine, for reference.

    @return: C{(client, server, processes)}.
    """
    import multiprocessing

    client, near = direct_pair()
    far, server = direct_pair()
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=loop, args=(near, far), daemon=True),
                 context.Process(target=loop, args=(far, near), daemon=True)]
    for process in processes:
        process.start()
    near.close()
    far.close()
    return client, server, processes


def proxied_pair(port, key):
    """A client and a server paired through the proxy at C{port}."""
    server = socket.create_connection(("127.0.0.1", port))
    server.sendall(encode_handshake("server:" + key))
    time.sleep(0.05)
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(encode_handshake("client:" + key))
    for sock, partner in ((server, "client:" + key), (client, "server:" + key)):
        reply = encode_reply(RPC_CODE_SUCCESS, partner)
        got = recv_exactly(sock, len(reply))
        if got != reply:
            raise RuntimeError(f"bad pairing reply {got!r}")
    return client, server


def send_all(sock, total):
    view = memoryview(BLOCK)
    sent = 0
    while sent < total:
        n = min(len(BLOCK), total - sent)
        sock.sendall(view[:n])
        sent += n


def transfer(sender, receiver, total, rate=None, on_chunk=None):
    """
    Send C{total} bytes from C{sender} to C{receiver}; the reader is limited
    to C{rate} bytes per second when given.

    @return: seconds taken.
    """
    thread = threading.Thread(target=send_all, args=(sender, total), daemon=True)
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    started = time.perf_counter()
    thread.start()
    received = 0
    while received < total:
        n = receiver.recv_into(view, min(len(buffer), total - received))
        if not n:
            raise ConnectionError("closed early")
        received += n
        if rate:
            behind = received / rate - (time.perf_counter() - started)
            if behind > 0:
                time.sleep(behind)
        if on_chunk:
            on_chunk()
    elapsed = time.perf_counter() - started
    thread.join()
    return elapsed


def one_pair(make_pair, size, pid=None):
    """
    Move C{size} bytes client -> server, then the same back, through one
    fresh pair from C{make_pair()} (C{(client, server, cleanup)}).

    @return: C{(up MB/s, down MB/s, CPU seconds per GiB relayed)} where the
        CPU is that of the process group C{pid} (L{None} without).
    """
    client, server, cleanup = make_pair()
    try:
        before = tree_cpu_seconds(pid) if pid else 0.0
        up = size / transfer(client, server, size) / 1e6
        down = size / transfer(server, client, size) / 1e6
        cpu = (tree_cpu_seconds(pid) - before) / (2 * size / (1 << 30)) if pid else None
    finally:
        client.close()
        server.close()
        cleanup()
    return up, down, cpu


def aggregate(make_pair, pairs, size, pid=None):
    """
    Move C{size} bytes through each of C{pairs} fresh pairs at once (client to
    server), one thread per pair.

    @return: C{(aggregate MB/s, CPU seconds per GiB of the process group pid)}.
    """
    made = [make_pair() for i in range(pairs)]
    try:
        before = tree_cpu_seconds(pid) if pid else 0.0
        started = time.perf_counter()
        threads = [threading.Thread(target=transfer, args=(client, server, size))
                   for client, server, _ in made]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        cpu = (tree_cpu_seconds(pid) - before) / (pairs * size / (1 << 30)) if pid else None
    finally:
        for client, server, cleanup in made:
            client.close()
            server.close()
            cleanup()
    return pairs * size / elapsed / 1e6, cpu


def slow_reader_memory(port, pid, size, rate):
    """
    @return: C{(cold, idle, peak growth, growth left after close)} in bytes:
        C{cold} before any pair, C{idle} after one warm-up pair closed.
    """
    cold = tree_rss(pid)
    warm_client, warm_server = proxied_pair(port, "warm")
    transfer(warm_client, warm_server, 8 * MiB)
    warm_client.close()
    warm_server.close()
    time.sleep(2.0)
    idle = tree_rss(pid)
    peak = [idle]
    last = [0.0]

    def sample():
        now = time.perf_counter()
        if now - last[0] > 0.05:
            last[0] = now
            peak[0] = max(peak[0], tree_rss(pid))

    client, server = proxied_pair(port, "slow")
    transfer(client, server, size, rate=rate, on_chunk=sample)
    peak[0] = max(peak[0], tree_rss(pid))
    client.close()
    server.close()
    time.sleep(2.0)
    return cold, idle, peak[0] - idle, tree_rss(pid) - idle


def median(values):
    """@return: the median of C{values} (the mean of the middle two for an even count)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--slow-mib", type=int, default=1024,
                        help="MiB carried through our proxy to a slow reader")
    parser.add_argument("--tvm-slow-mib", type=int, default=256,
                        help="MiB carried through TVM's proxy to a slow reader")
    parser.add_argument("--slow-rate", type=float, default=100, help="slow reader MB/s")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds; each round measures every path once, in turn")
    parser.add_argument("--pairs", type=int, default=4,
                        help="pairs relaying at once in the concurrent measurement")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the figures into docs/benchmarks.md (## Proxy)")
    args = parser.parse_args()
    load = os.getloadavg()
    size = args.size_mib * MiB
    rate = args.slow_rate * 1e6
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"{args.size_mib} MiB each way, {args.rounds} rounds")

    def plain_pair():
        client, server = direct_pair()
        return client, server, lambda: None

    def reference_pair(loop):
        def make():
            client, server, processes = reference_relay_pair(loop)

            def cleanup():
                # Each process also holds the pair's outer sockets (fork), so
                # it never sees end of file: stop it.
                for process in processes:
                    process.terminate()
                    process.join(10)
            return client, server, cleanup
        return make

    def through(port):
        count = itertools.count()

        def make():
            client, server = proxied_pair(port, f"k{next(count)}")
            return client, server, lambda: None
        return make

    paths = ["direct", "copyloop", "spliceloop", "ours", "plain", "tvm"]
    single = {name: [] for name in paths if name != "spliceloop" or hasattr(os, "splice")}
    concurrent = {"direct": [], "ours": [], "plain": [], "tvm": []}
    with contextlib.ExitStack() as stack:
        daemons = {"ours": stack.enter_context(our_proxy()),
                   "plain": stack.enter_context(our_proxy("--no-splice")),
                   "tvm": stack.enter_context(tvm_proxy())}
        makers = {"direct": plain_pair, "copyloop": reference_pair(_copy_loop),
                  "spliceloop": reference_pair(_splice_loop)}
        pids = {}
        for name, (daemon, port) in daemons.items():
            makers[name] = through(port)
            pids[name] = daemon.proc.pid
        # Every path is measured once per round, in turn: the machine's speed
        # drifts (the direct baseline alone moves by half between minutes),
        # so each path is compared with the baseline of its own round.
        for number in range(args.rounds):
            for name in single:
                single[name].append(one_pair(makers[name], size, pids.get(name)))
            for name in concurrent:
                concurrent[name].append(aggregate(makers[name], args.pairs, size // 2,
                                                  pids.get(name)))
            print(f"round {number + 1}: " + ", ".join(
                f"{name} {sum(single[name][-1][:2]) / 2:.0f}" for name in single) + " MB/s",
                flush=True)
    # Memory is measured on fresh daemons, so "at start" means just started.
    with our_proxy() as (daemon, port):
        time.sleep(0.5)
        ours_mem = slow_reader_memory(port, daemon.proc.pid, args.slow_mib * MiB, rate)
    with our_proxy("--no-splice") as (daemon, port):
        time.sleep(0.5)
        plain_mem = slow_reader_memory(port, daemon.proc.pid, args.slow_mib * MiB, rate)
    with tvm_proxy() as (daemon, port):
        time.sleep(0.5)
        tvm_mem = slow_reader_memory(port, daemon.proc.pid, args.tvm_slow_mib * MiB, rate)

    def means(name):
        return [(up + down) / 2 for up, down, _ in single[name]]

    def ratio(name, other, table=None):
        """The median over rounds of C{name}'s MB/s over C{other}'s in the same round."""
        if table is None:
            return median([a / b for a, b in zip(means(name), means(other))])
        return median([a[0] / b[0] for a, b in zip(table[name], table[other])])

    references = [name for name in ("copyloop", "spliceloop") if name in single]
    best_reference = max(references, key=lambda name: ratio(name, "direct"))
    labels = {"direct": "direct socket (baseline)",
              "copyloop": "blocking copy-loop relay (reference)",
              "spliceloop": "blocking splice-loop relay (reference)",
              "ours": "ours (`twistd rpc-proxy`, splice, the default)",
              "plain": "ours (`twistd rpc-proxy --no-splice`)", "tvm": "TVM's `rpc_proxy`"}
    table = ["| path | up MB/s | down MB/s | mean MB/s | x direct | x TVM's proxy "
             "| proxy CPU s per GiB |", "|---|---|---|---|---|---|---|"]
    for name in ("direct", *references, "ours", "plain", "tvm"):
        rows = single[name]
        cpus = [cpu for _, _, cpu in rows if cpu is not None]
        table.append(f"| {labels[name]} | {median([r[0] for r in rows]):.0f} | "
                     f"{median([r[1] for r in rows]):.0f} | {median(means(name)):.0f} | "
                     f"{ratio(name, 'direct'):.2f} | {ratio(name, 'tvm'):.2f} | "
                     f"{f'{median(cpus):.2f}' if cpus else ''} |")
    per_round = ["| round | " + " | ".join(single) + " |",
                 "|---|" + "---|" * len(single)]
    for number in range(args.rounds):
        per_round.append(f"| {number + 1} | " + " | ".join(
            f"{means(name)[number]:.0f}" for name in single) + " |")
    ours_ratios = [a / b for a, b in zip(means("ours"), means("direct"))]
    many_table = ["| path | aggregate MB/s | x direct | x TVM's proxy | proxy CPU s per GiB |",
                  "|---|---|---|---|---|"]
    for name in concurrent:
        rows = concurrent[name]
        cpus = [cpu for _, cpu in rows if cpu is not None]
        many_table.append(f"| {labels[name]} | {median([r[0] for r in rows]):.0f} | "
                          f"{ratio(name, 'direct', concurrent):.2f} | "
                          f"{ratio(name, 'tvm', concurrent):.2f} | "
                          f"{f'{median(cpus):.2f}' if cpus else ''} |")
    memory = ["| proxy | carried to the slow reader | RSS at start (MiB) | idle RSS after a "
              "warm-up pair (MiB) | peak growth over idle (MiB) "
              "| growth left 2 s after close (MiB) |", "|---|---|---|---|---|---|"]
    for name, mib, (cold, idle, growth, left) in (("ours (splice)", args.slow_mib, ours_mem),
                                                  ("ours (--no-splice)", args.slow_mib,
                                                   plain_mem),
                                                  ("TVM's", args.tvm_slow_mib, tvm_mem)):
        memory.append(f"| {name} | {mib} MiB | {cold / MiB:.0f} | {idle / MiB:.0f} | "
                      f"{growth / MiB:.1f} | {left / MiB:.1f} |")
    ours_growth, ours_left = ours_mem[2] / MiB, ours_mem[3] / MiB
    ours_from_cold = (ours_mem[1] + ours_mem[2] - ours_mem[0]) / MiB

    def verdict(ok):
        return "met" if ok else "NOT met"

    ours_direct = ratio("ours", "direct")
    targets = [
        f"- ours >= 0.8x the direct baseline: {ours_direct:.2f}x, median of the rounds "
        f"({verdict(ours_direct >= 0.8)}; rounds {min(ours_ratios):.2f}x to "
        f"{max(ours_ratios):.2f}x; `--no-splice`: {ratio('plain', 'direct'):.2f}x). A relay "
        f"hop adds a third busy process on this machine: the best bare reference relay "
        f"({labels[best_reference]}) reaches {ratio(best_reference, 'direct'):.2f}x; ours "
        f"relays {ratio('ours', best_reference):.2f}x what it relays, `--no-splice` "
        f"{ratio('plain', best_reference):.2f}x",
        f"- with {args.pairs} pairs at once, ours (splice) relays "
        f"{ratio('ours', 'plain', concurrent):.2f}x what `--no-splice` relays "
        f"and {ratio('ours', 'direct', concurrent):.2f}x the direct sockets",
        f"- ours >= 2x TVM's proxy: {ratio('ours', 'tvm'):.2f}x "
        f"({verdict(ratio('ours', 'tvm') >= 2)})",
        f"- slow reader, {args.slow_mib} MiB through ours: growth {ours_growth:.1f} MiB < 32 MB "
        f"({verdict(ours_growth * MiB < 32e6)}); left after close {ours_left:.1f} MiB; "
        f"peak over the RSS at start (warm-up included) {ours_from_cold:.1f} MiB "
        f"({verdict(ours_from_cold * MiB < 32e6)})",
    ]
    body = "\n".join([
        f"Measured by `python bench/proxy_relay.py` at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the start (a shared "
        f"machine: figures move between runs). {args.rounds} rounds; each round moves "
        f"{args.size_mib} MiB each way through one fresh pair of every path in turn, so every "
        f"ratio is taken within a round (the direct baseline alone drifts by half between "
        f"minutes) and the median over the rounds is shown; MB/s are medians too. CPU is the "
        f"proxy's process group's user + system seconds per GiB relayed; the client and "
        f"server are threads of the benchmark process using blocking sockets; the proxies "
        f"run side by side, idle but for the path being measured; TVM's proxy is started "
        f"with `--web-port 0`.",
        "", *table, "",
        "Mean MB/s of each path, round by round:", "", *per_round, "",
        f"{args.pairs} pairs at once, {args.size_mib // 2} MiB each from client to server, "
        f"one thread per pair, once per round (medians):", "", *many_table, "",
        f"Slow reader: the writer sends as fast as it can, the reader takes at most "
        f"{args.slow_rate:g} MB/s; RSS is the proxy's whole process group (TVM's runs in a "
        f"child), sampled every 50 ms, on a freshly started proxy; growth is counted from "
        f"the idle proxy after one 8 MiB warm-up pair has come and gone, 2 s later (ours "
        f"gives its free heap back a second after a pair ends).", "", *memory, "",
        "Against issue 4's targets:", "", *targets,
    ])
    print(body)
    if args.write_docs:
        from bench.common import DOCS, replace_section

        replace_section(DOCS, "Proxy", body)
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()

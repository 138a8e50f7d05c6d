"""Sessions in child processes over loopback TCP, for the session tests and the
memory checks of C{bench/bounds.py}: a 256 MiB upload and download, and a
client that floods the server with reads it never reads back.

Each runs our session protocol (no handshake, no worker) in a process of its
own, so the process's memory is the session's.
"""

import json
import os
import select
import subprocess
import sys
import textwrap
import time

from twisted.protocols import amp

from tvm_rpc.protocol import session_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Client and server in one process: a SIZE-byte upload then download, byte
#: for byte, reporting the process's RSS growth (both ends together).
ROUND_TRIP = textwrap.dedent('''
    import hashlib, json, os, resource, shutil, sys, tempfile
    from twisted.internet import defer, endpoints, protocol, reactor
    from twisted.protocols import amp
    from tvm_rpc.protocol import session_commands
    from tvm_rpc.protocol.streams import read_stream, write_stream
    from tvm_rpc.server.session import make_session_protocol

    SIZE = int(sys.argv[1])
    root = tempfile.mkdtemp()

    def rss_kib():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])

    def chunks(digest):
        block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB of pattern
        sent = 0
        counter = 0
        while sent < SIZE:
            counter += 1
            piece = (counter.to_bytes(8, "little") + block)[:min(session_commands.CHUNK_SIZE, SIZE - sent)]
            digest.update(piece)
            sent += len(piece)
            yield piece

    async def main():
        factory = protocol.Factory.forProtocol(
            lambda: make_session_protocol(root, clock=reactor, backend="python"))
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        client = await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), amp.AMP())
        base = rss_kib()
        peak = [base]
        sent_digest = hashlib.sha256()
        stream = (await client.callRemote(session_commands.OpenUpload, path="big.bin", size=SIZE))["stream"]

        def watched(iterator):
            for i, piece in enumerate(iterator):
                if i % 4 == 0:
                    peak[0] = max(peak[0], rss_kib())
                yield piece

        await write_stream(client.callRemote, stream, watched(chunks(sent_digest)))
        answer = await client.callRemote(session_commands.OpenDownload, path="big.bin")
        got_digest = hashlib.sha256()
        count = [0]

        def consume(data):
            got_digest.update(data)
            count[0] += 1
            if count[0] % 4 == 0:
                peak[0] = max(peak[0], rss_kib())

        size = await read_stream(client.callRemote, answer["stream"], answer["size"], consume)
        await client.callRemote(session_commands.Goodbye)
        port.stopListening()
        return {"size": size, "same": sent_digest.hexdigest() == got_digest.hexdigest(),
                "growth_kib": peak[0] - base, "left": os.listdir(root)}

    result = {}
    def done(value):
        result.update(value)
        reactor.callLater(0.2, reactor.stop)
    def failed(failure):
        result["error"] = failure.getTraceback()
        reactor.stop()
    reactor.callWhenRunning(lambda: defer.ensureDeferred(main()).addCallbacks(done, failed))
    reactor.run()
    result["left"] = os.listdir(root)
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))
''')


def round_trip(size, timeout=240):
    """
    Run L{ROUND_TRIP} for C{size} bytes in a child process.

    @return: its report: C{size}, C{same} (the digests agree), C{left} (the
        work directory's entries afterwards), C{growth_kib}, or C{error}.
    @raise AssertionError: when the child fails.
    """
    completed = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP, str(size)],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


#: A session server alone on a port the system picks (printed first).
FLOOD_SERVER = textwrap.dedent('''
    import tempfile
    from twisted.internet import endpoints, protocol, reactor
    from tvm_rpc.server.session import make_session_protocol

    root = tempfile.mkdtemp()
    factory = protocol.Factory.forProtocol(
        lambda: make_session_protocol(root, clock=reactor, backend="python"))
    endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    endpoint.listen(factory).addCallback(lambda port: print(port.getHost().port, flush=True))
    reactor.run()
''')


def start_flood_server():
    """
    Start L{FLOOD_SERVER}.

    @return: C{(process, port)}; the caller kills and waits for the process.
    """
    server = subprocess.Popen(
        [sys.executable, "-c", FLOOD_SERVER], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT,
    )
    return server, int(server.stdout.readline())


def ask(sock, buffered, command, tag, **arguments):
    """
    Send one command on a blocking socket and wait for its answer.

    @param buffered: a one-item list holding the bytes read but not parsed yet.
    @return: the answer box.
    """
    box = command.makeArguments(arguments, None)
    box[b"_command"] = command.commandName
    box[b"_ask"] = tag
    sock.sendall(box.serialize())
    while True:
        try:
            boxes = amp.parseString(buffered[0])
        except Exception:
            boxes = []
        if boxes and buffered[0].endswith(b"\x00\x00"):
            buffered[0] = b""
            return boxes[0]
        buffered[0] += sock.recv(65536)


def open_array_stream(sock, buffered, size):
    """Allocate a C{size}-byte array on the server; @return: a read stream over it."""
    answer = ask(sock, buffered, session_commands.Empty, b"1", shape=[size], dtype="uint8",
                 device_type=1, device_id=0)
    assert int(answer[b"nbytes"]) == size
    return ask(sock, buffered, session_commands.OpenArrayRead, b"2",
               array=int(answer[b"array"]))[b"stream"]


def flood_unread_reads(sock, stream, size, seconds=5):
    """
    Ask for every chunk of C{stream} (C{size} bytes) at once and read none of
    the answers, sending for at most C{seconds}.

    @return: how many bytes of requests were sent.
    """
    chunk = session_commands.CHUNK_SIZE
    flood = b"".join(
        amp.AmpBox(_command=b"StreamRead", _ask=b"r%d" % i, stream=stream,
                   offset=b"%d" % (i * chunk), length=b"%d" % chunk).serialize()
        for i in range(size // chunk)
    )
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < len(flood):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        # The server stops reading once its replies back up: wait until it reads again.
        if select.select([], [sock], [], left)[1]:
            try:
                sent += sock.send(flood[sent:])
            except BlockingIOError:
                pass
    return sent

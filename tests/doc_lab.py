"""Run a doc's walkthrough (see L{doc_blocks}) as a reader would, on loopback.

Each doc runs in a fresh directory that mirrors the checkout (symlinks to its
top-level entries, so C{python docs/examples/...} works and what the doc
writes lands in the temporary directory). Commands run through C{bash} with a
directory of stand-ins first on C{PATH}: C{python}/C{python3}/C{twistd}/
C{tvm-rpc-query} run this tree (as C{pip install .} would have installed it);
C{ssh HOST cmd} runs C{cmd} here; C{scp FILE HOST:} finds the file already on
the "device" (this directory); C{pip}, C{systemctl} and the like refuse. Daemons are started in their own process
groups and stopped by group when the walkthrough ends.
"""

import ast
import json
import random
import re
import socket
import time
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import attrs

import daemons
import doc_blocks
from doc_blocks import Block, LabStep

ROOT = daemons.ROOT
#: How long one command or example may run (compiling with TVM included).
RUN_TIMEOUT = 180

STANDINS = {
    "python": 'exec "{python}" "$@"',
    "python3": 'exec "{python}" "$@"',
    # -P: like the installed twistd script, the current directory is not on
    # sys.path (python -c would put it there and hide a missing PYTHONPATH=.).
    "twistd": 'exec "{python}" -P -c "from twisted.scripts.twistd import run; run()" "$@"',
    "tvm-rpc-query": 'exec "{python}" -m tvm_rpc.query "$@"',
    # ssh HOST [cmd...]: the device is this machine.
    "ssh": 'shift; exec bash -c "$*"',
    # scp FILE HOST:[DIR]: the device's home is this directory; refuse elsewhere.
    "scp": ('dest="${{2#*:}}"; if [ -z "$dest" ]; then [ -e "$1" ]; exit; fi; '
            'echo "scp stand-in: only HOST: (this directory) is supported, not $2" >&2; exit 1'),
}
#: Commands that change this machine: a documented line running one must be
#: named in the test's list of lines that cannot run, never run by accident.
for _name in ("pip", "pip3", "sudo", "systemctl", "useradd", "apt", "apt-get"):
    STANDINS[_name] = (f'echo "{_name}: not run by the docs test; name this line, with'
                       ' the reason, in NOT_RUN of tests/test_docs_run.py" >&2; exit 1')


def make_standins(directory):
    """Write the stand-in commands into C{directory}; @return: it."""
    directory.mkdir()
    for name, body in STANDINS.items():
        path = directory / name
        # This tree first, as if installed; a doc's own PYTHONPATH=. is kept after it.
        path.write_text(f'#!/bin/bash\nexport PYTHONPATH="{ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
                        + body.format(python=sys.executable) + "\n")
        path.chmod(0o755)
    return directory


class DocFailed(AssertionError):
    """A doc step failed as written."""


@attrs.define
class Walk:
    """
    One doc's walkthrough in progress.

    @ivar name: the doc's name, for messages.
    @ivar work: the working directory.
    @ivar rewrite: the doc's L{doc_blocks.Rewriter}.
    @ivar library: a function returning the path of the compiled dense + ReLU library.
    @ivar allowed: C{{line or first line: reason}} of this doc's steps that cannot run here.
    @ivar running: C{(kind, argv, daemon)} of each daemon started and not replaced.
    @ivar record: one line per step done or skipped, for the test's output.
    @ivar free_port: returns a free loopback port, for a daemon's default one.
    """

    name: str
    work: Path
    rewrite: doc_blocks.Rewriter
    library: object
    allowed: dict = attrs.Factory(dict)
    running: list = attrs.Factory(list)
    record: list = attrs.Factory(list)
    free_port: object = daemons.free_port
    _tracker: str = None
    _env: dict = None

    def __attrs_post_init__(self):
        for entry in ROOT.iterdir():
            if not entry.name.startswith("."):
                (self.work / entry.name).symlink_to(entry)
        bin_dir = make_standins(self.work / ".doc-bin")
        env = daemons.child_env()
        env.pop("PYTHONPATH")
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
        if 9190 in self.rewrite.ports:
            # The query tool's default tracker port is a documented port too.
            env["TVM_TRACKER_PORT"] = str(self.rewrite.ports[9190])
        self._env = env

    def run(self, steps):
        """Run every step in order; @raise DocFailed: at the first that fails."""
        for step in steps:
            where = f"{self.name}:{step.line}"
            began = len(self.record), time.monotonic()
            if isinstance(step, LabStep):
                self.lab(step.directive, where)
                continue
            kind = doc_blocks.classify(step)
            if kind == "shell":
                for number, line in doc_blocks.shell_commands(step):
                    self.shell(line, f"{self.name}:{number}: {line}")
            elif kind == "python":
                self.python(step, where)
            elif kind == "python file":
                name = doc_blocks.FILE_HEADER.match(step.lines[0]).group(1)
                (self.work / name).write_text(self.rewrite(step.text))
                self.record.append(f"{where}: wrote {name}")
            elif kind == "output":
                self.output(step, where)
            elif kind == "json":
                try:
                    json.loads(step.text)
                except ValueError as e:
                    raise DocFailed(f"{where}: a ```json block that does not parse: {e}") from None
                self.record.append(f"{where}: json parses")
            else:
                self.record.append(f"{where}: read only (```{step.info})")
            if len(self.record) > began[0]:
                self.record[-1] += f" [{time.monotonic() - began[1]:.1f}s]"

    def lab(self, directive, where):
        """Set up the part of the lab a standalone directive names."""
        word, *rest = directive.split()
        if word == "let":
            self.rewrite.words.update(item.split("=", 1) for item in rest)
        elif word == "file":
            shutil.copy(self.library(), self.work / rest[0])
        elif word == "tracker":
            self._tracker = rest[0]
            port = rest[0].rpartition(":")[2]
            self.start(f"twistd -n --pidfile= rpc-tracker --port {port}", where)
        elif word == "server":
            if self._tracker is None:
                raise DocFailed(f"{where}: 'server' before any 'tracker' directive")
            line = f"twistd -n --pidfile= rpc-server --tracker {self._tracker} --key {rest[0]}"
            if rest[1:2] == ["at"]:
                host, _, port = rest[2].rpartition(":")
                line += f" --listen tcp:{port}:interface={host}"
            self.start(line, where)
        self.record.append(f"{where}: lab {directive}")

    def shell(self, line, where):
        """Run one documented shell line: start a daemon, or run a command to its end."""
        reason = self.allowed.get(doc_blocks.command_text(line))
        if reason is not None:
            self.record.append(f"{where}: NOT RUN: {reason}")
            return
        argv, _ = doc_blocks.command_words(line)
        if doc_blocks.daemon_kind(argv):
            self.start(line, where)
        else:
            self.settle(where)
            self.command(["bash", "-c", self.rewrite(line)], where)

    def start(self, line, where):
        """Start a daemon as documented, on loopback; wait until it serves."""
        words = shlex.split(self.rewrite(line), comments=True)
        argv, _ = doc_blocks.command_words(shlex.join(words))
        kind = doc_blocks.daemon_kind(argv)
        if kind == "twistd" or (argv[0] == "twistd" and "-n" not in argv):
            raise DocFailed(f"{where}: twistd without -n (or of no daemon of ours) "
                            "leaves the foreground: the docs run daemons with twistd -n")
        port = doc_blocks.option(argv, "--port")
        for other in list(self.running):
            if port is not None and doc_blocks.option(other[1], "--port") == port:
                # The doc offers this one instead of the other (same port).
                other[2].stop()
                self.running.remove(other)
        if "--listen" not in argv and "--through-proxy" not in argv:
            # The tests listen on loopback only, and never on a port of the docs'
            # defaults (9090 up) that a person may be using: a daemon's default is 0.0.0.0:9090.
            extra = [] if "--host" in argv else ["--host", "127.0.0.1"]
            if kind == "rpc-proxy" and "--web-port" not in argv:
                extra += ["--web-port", str(self.free_port())]
            if port is None:
                free = self.free_port()
                extra += ["--port", str(free), "--port-end", str(free + 1)]
            elif doc_blocks.option(argv, "--port-end") is None:
                # The default end (9199) is below a mapped port: keep the range one port.
                extra += ["--port-end", str(int(port) + 1)]
            words += extra
            argv += extra
        daemon = daemons.Daemon(["bash", "-c", shlex.join(words)], env=self._env, cwd=self.work)
        self.running.append((kind, argv, daemon))
        try:
            if kind == "tvm":
                bound = daemon.wait_for(r"bind to \S+:(\d+)", 60)
                daemons.wait_listening(int(bound.group(1)))
            elif "--through-proxy" not in argv:
                daemon.wait_for(rf"{kind} listening on \S+:\d+", 60)
            if "--http" in argv:
                daemon.wait_for(rf"{kind} http listening on \S+:\d+", 60)
        except AssertionError as e:
            raise DocFailed(f"{where}: the daemon did not start as written:\n{e}") from None
        self.record.append(f"{where}: started {kind}")

    def command(self, argv, where, expect_output=None):
        """Run a command to its end; @return: its stdout. @raise DocFailed: when it fails."""
        try:
            done = subprocess.run(argv, cwd=self.work, env=self._env, capture_output=True,
                                  text=True, timeout=RUN_TIMEOUT, start_new_session=True)
        except subprocess.TimeoutExpired as e:
            raise DocFailed(f"{where}: still running after {RUN_TIMEOUT}s:\n{e.stdout}\n{e.stderr}")
        if done.returncode != 0:
            raise DocFailed(f"{where}: exit status {done.returncode}\n"
                            f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}")
        self.record.append(f"{where}: ran")
        return done.stdout

    def python(self, block, where):
        """Run a python block as a script, unless it is one this doc cannot run here."""
        reason = self.allowed.get(block.lines[0])
        if reason is not None:
            # Not run, but it must still be Python (await at the top level allowed).
            compile(block.text, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            self.record.append(f"{where}: python NOT RUN (compiled only): {reason}")
            return
        script = self.work / f"doc_block_{block.line}.py"
        script.write_text(self.rewrite(block.text))
        self.settle(where)
        self.command(["python", script.name], f"{where} (python)")

    def output(self, block, where):
        """Run the command the directive names; its output must be the block."""
        command = block.directive.removeprefix("output of ").strip()
        self.settle(where)
        actual = self.rewrite.back(self.command(["bash", "-c", self.rewrite(command)], where))
        if not doc_blocks.loose_output_match(block.text, actual):
            raise DocFailed(f"{where}: {command!r} printed\n{actual}\nnot what the doc shows:\n"
                            f"{block.text}")

    def settle(self, where):
        """
        Wait until every server started so far is registered and free at its
        tracker (the one bounded poll): a reader runs the next command once the
        servers are up and the previous example's sessions closed.
        """
        wanted = {}
        for kind, argv, daemon in self.running:
            tracker, key = doc_blocks.option(argv, "--tracker"), doc_blocks.option(argv, "--key")
            if kind in {"rpc-server", "tvm"} and tracker and key:
                address = tracker.rpartition(":")
                wanted.setdefault((address[0], int(address[2])), {}).setdefault(key, 0)
                wanted[(address[0], int(address[2]))][key] += 1
        for (host, port), keys in wanted.items():
            try:
                daemons.wait_summary(port, lambda s: all(
                    daemons.free_servers(s, key) >= n for key, n in keys.items()), 60, host)
            except AssertionError as e:
                raise DocFailed(f"{where}: the doc's servers {keys} never all registered "
                                f"at {host}:{port}: {e}") from None

    def stop(self):
        """Stop every daemon started, by process group."""
        while self.running:
            self.running.pop()[2].stop()


def loopback_port():
    """
    @return: a loopback port free a moment ago, below the system's ephemeral
        range: no outgoing connection of another test takes it meanwhile (only
        a listener named by its number could).
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(20000, low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free loopback port in 20000-{low} after 100 tries")


#: How many times a walkthrough is run again, on other ports, when one of its
#: ports was taken between picking and binding (another process listened there).
ATTEMPTS = 3


def walk(path, work, library, allowed, free_port=loopback_port):
    """
    Run the doc at C{path} in the empty directory C{work}.

    @return: the L{Walk}, its daemons stopped.
    @raise DocFailed: at the first step that fails as written.
    """
    steps = doc_blocks.steps_of(path.read_text())
    documented = doc_blocks.documented_ports(steps)
    for attempt in range(1, ATTEMPTS + 1):
        ports = set()
        while len(ports) < len(documented):
            ports.add(free_port())
        # In order, so a documented range (--port 9190 --port-end 9199) stays a range.
        mapping = dict(zip(documented, sorted(ports)))
        name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
        directory = work / f"attempt{attempt}"
        directory.mkdir()
        done = Walk(name, directory, doc_blocks.Rewriter(mapping), library, allowed,
                    free_port=free_port)
        try:
            done.run(steps)
        except DocFailed as e:
            if attempt == ATTEMPTS or not re.search(daemons.BIND_FAILED, str(e)):
                raise
            done.record.append(f"a port was taken: running {name} again on other ports")
        else:
            return done
        finally:
            done.stop()

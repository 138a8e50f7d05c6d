"""README.md and docs/ run as written: every fenced block of every doc is run
(shell lines, daemons included, and python examples against the live lab the
doc sets up), read as output it must match, or named below as one that cannot
run here, with the reason. A block nobody classified fails. See
L{doc_blocks} for the C{doc-test} directives and L{doc_lab} for how commands
run on loopback."""

import subprocess
import sys

import pytest

import daemons
import doc_blocks
import doc_lab

pytestmark = pytest.mark.system

ROOT = daemons.ROOT
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))

#: Documented lines (a shell line, or a python block's first line) that
#: cannot run in a test, per doc, each with the reason. A test below asserts
#: every entry still names a line of its doc.
NOT_RUN = {
    "README.md": {
        "bash scripts/demo.sh": "builds a virtual environment and installs apache-tvm from"
                                " PyPI; its steps are the daemons and examples run here",
        "bash scripts/test.sh": "the whole test suite, this test among it",
        "pip install .": "installs into the running environment: the stand-ins run this tree",
        "pip install '.[web]'": "installs from PyPI; the test environment has the extra",
        "pip install '.[tls]'": "installs from PyPI; tests/test_daemon.py covers --listen ssl:",
        "pip install '.[tvm]'": "installs from PyPI; the test environment has the extra",
        "pip install '.[test,tvm]'": "installs from PyPI; the test environment has the extras",
    },
    "docs/tracker.md": {
        "pip install .": "installs into the running environment: the stand-ins run this tree",
    },
    "docs/remote-device.md": {
        "pip install /path/to/tvm_rpc": "installs on the device: here the stand-ins run this tree",
    },
    "docs/client.md": {
        "from tvm_rpc.client.session import make_client_protocol, start_session":
            "a sketch of embedding a session in one's own protocol (transport, rest and"
            " the await are the embedder's); tests/test_session_client.py runs this path",
        "async def one_device():": "a condensed sketch of docs/examples/lab_measure.py,"
                                   " which the block before it runs",
    },
    "docs/deploy/README.md": {
        "useradd --system tvm-rpc": "creates a system user (root)",
        "python3 -m venv /opt/tvm_rpc/venv": "installs under /opt (root)",
        "/opt/tvm_rpc/venv/bin/pip install /path/to/tvm_rpc": "installs under /opt (root)",
        "/opt/tvm_rpc/venv/bin/pip install '/path/to/tvm_rpc[web]'": "installs under /opt (root)",
        "/opt/tvm_rpc/venv/bin/pip install '/path/to/tvm_rpc[tls]'": "installs under /opt (root)",
        "cp docs/deploy/rpc-tracker.service /etc/systemd/system/":
            "installs a systemd unit (root); tests/test_deploy_units.py checks the units",
        "systemctl daemon-reload": "systemd (root)",
        "systemctl enable --now rpc-tracker": "systemd (root); the unit's command line is"
                                              " checked by tests/test_deploy_units.py",
        "scp tvm-rpc-server.pyz device:/opt/tvm_rpc/": "copies to /opt on a device",
    },
}


def doc_id(path):
    """@return: the doc's path relative to the checkout."""
    return str(path.relative_to(ROOT))


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """
    The dense + ReLU library, compiled by docs/remote-device.md's own compile
    block (run once, as a doc step); @return: a function giving its path.
    """
    built = []

    def path():
        if not built:
            directory = tmp_path_factory.mktemp("library")
            block = next(step for step in doc_blocks.steps_of(
                (ROOT / "docs" / "remote-device.md").read_text())
                if isinstance(step, doc_blocks.Block) and "export_library" in step.text)
            (directory / "compile.py").write_text(block.text)
            subprocess.run([sys.executable, "compile.py"], cwd=directory, check=True,
                           env=daemons.child_env(), timeout=doc_lab.RUN_TIMEOUT)
            built.append(directory / "dense_relu.so")
        return built[0]

    return path


def lines_of(path):
    """@return: every shell command and python block's first line of a doc."""
    blocks = [step for step in doc_blocks.steps_of(path.read_text())
              if isinstance(step, doc_blocks.Block)]
    return ({doc_blocks.command_text(line) for block in blocks if block.info in {"sh", "bash"}
             for _, line in doc_blocks.shell_commands(block)}
            | {block.lines[0] for block in blocks if block.info == "python"})


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_doc_runs_as_written(path, tmp_path, library, tvm):
    """
    Every block of the doc runs (or matches, or is named in L{NOT_RUN}); the
    docs assume apache-tvm on the host (TVM's server, compiling, TVM's client).
    """
    done = doc_lab.walk(path, tmp_path, library, NOT_RUN.get(doc_id(path), {}))
    print("\n".join(done.record))


def test_not_run_names_only_lines_that_exist():
    """The list of lines that cannot run does not rot: each still is in its doc."""
    stale = [(name, line) for name, entries in NOT_RUN.items() for line in entries
             if line not in lines_of(ROOT / name)]
    assert stale == []


def test_every_doc_has_blocks_and_runs_some():
    """The docs hold runnable blocks, so a change to how blocks are found cannot
    turn the walkthroughs into no-ops."""
    runnable = [step for path in DOCS for step in doc_blocks.steps_of(path.read_text())
                if isinstance(step, doc_blocks.Block) and doc_blocks.classify(step) in
                {"shell", "python", "output"}]
    assert len(runnable) >= 20


def broken_doc(tmp_path, text):
    """Run a small doc written for the test; @return: the failure."""
    doc = tmp_path / "broken.md"
    doc.write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises((doc_lab.DocFailed, doc_blocks.UnclassifiedBlock)) as failed:
        doc_lab.walk(doc, work, None, {})
    return str(failed.value)


@pytest.mark.parametrize("text, says", [
    ("```python\nraise RuntimeError('as written')\n```\n", "as written"),
    ("```json\n{\"key\": \"rasp\",}\n```\n", "does not parse"),
    ("```sh\ntwistd -n --pidfile= rpc-tracker --port 9190 --no-such-option\n```\n",
     "did not start as written"),
    ("```sh\ntwistd -n rpc-tracker --port 9190\ntwistd -n rpc-proxy --port 9090\n```\n",
     "did not start as written"),
    ("```sh\npython -m tvm_rpc.query --json --leases\n```\n", "exit status 2"),
    ("```sh\npip install tvm_rpc\n```\n", "name this line"),
    ("```python\n# mydevice.py\nX = 1\n```\n"
     "```sh\ntwistd -n --pidfile= rpc-server --key rasp --init mydevice\n```\n",
     "did not start as written"),
    ("```python\n# mydevice.py\nraise ImportError('as written')\n```\n"
     "```sh\nPYTHONPATH=. python -c 'import mydevice'\n```\n", "as written"),
    ("```\npython -m tvm_rpc.query\n```\n", "nobody classified"),
    ("<!-- doc-test: tracker 127.0.0.1:9190 -->\n"
     "<!-- doc-test: output of python -m tvm_rpc.query --port 9190 -->\n"
     "```text\nTracker address 127.0.0.1:9191\n```\n", "not what the doc shows"),
    ("```sh\ntwistd -n --pidfile= rpc-proxy --port 9090 --web-port notaport\n```\n",
     "did not start as written"),
])
def test_runner_fails_on_a_broken_doc(tmp_path, text, says):
    """The runner fails on a doc that fails as written, so the test above can fail."""
    assert says in broken_doc(tmp_path, text)


def test_rewrite_keeps_a_doc_consistent():
    """One documented port becomes one free port everywhere in a doc, a range
    stays ordered, hosts become loopback, and output reads back as documented."""
    steps = doc_blocks.steps_of(
        "```sh\ntwistd -n --pidfile= rpc-tracker --host 0.0.0.0 --port 9190 --port-end 9199\n```\n"
        "```python\nconnect_tracker('tracker.lab', 9190)\n```\n")
    assert doc_blocks.documented_ports(steps) == [9190, 9199]
    rewrite = doc_blocks.Rewriter({9190: 40001, 9199: 40007})
    assert rewrite(steps[0].text).split()[5:] == ["127.0.0.1", "--port", "40001",
                                                  "--port-end", "40007"]
    assert rewrite(steps[1].text) == "connect_tracker('127.0.0.1', 40001)\n"
    assert rewrite.back("Tracker address 127.0.0.1:40001") == "Tracker address 127.0.0.1:9190"

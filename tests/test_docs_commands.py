"""The command lines of README.md and docs/*.md: each daemon, bundle and query
tool command in a fenced shell block parses with the real options, so the docs
cannot name a flag that does not exist or drift into a line that fails as
written (a second C{twistd -n} in one directory, an C{--init} module that is
not importable)."""

import os
import re
import shlex
from pathlib import Path

import pytest
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from tvm_rpc import query
from tvm_rpc.proxy import tap as proxy_tap
from tvm_rpc.server import tap as server_tap
from tvm_rpc.tracker import tap as tracker_tap

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

#: Each daemon's twistd subcommand and its options.
DAEMONS = {
    "rpc-tracker": tracker_tap.Options,
    "rpc-proxy": proxy_tap.Options,
    "rpc-server": server_tap.Options,
}
#: The info strings of fenced blocks that hold shell commands (bare C{```} too).
SHELL_INFO = {"sh", "bash", ""}
#: A line that runs one of the programs checked here (after environment assignments);
#: other lines of those blocks are output, logs or other tools.
OUR_COMMAND = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(twistd|python3?|tvm-rpc-query|ssh)\s")
#: A leading C{NAME=value} environment assignment.
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
#: twistd's pid file in the current directory when none is given (twistd makes it
#: absolute); a second daemon in that directory refuses to start.
TWISTD_DEFAULT_PIDFILE = "twistd.pid"


def shell_lines(text):
    """
    @return: the lines of a Markdown text's fenced shell blocks, stripped.
    """
    fence = None
    for line in text.splitlines():
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence = stripped[3:].strip()
        elif stripped == "```":
            fence = None
        elif fence in SHELL_INFO:
            yield stripped


def shell_commands(text):
    """
    @return: C{(environment, argv)} for each command line of ours in the
        shell blocks of a Markdown text, comments dropped; synopsis lines (with
        C{[...]} or C{...} placeholders) left out; C{ssh HOST} dropped.
    """
    for line in shell_lines(text):
        if not OUR_COMMAND.match(line):
            continue
        argv = shlex.split(line, comments=True)
        if any(word == "..." or word.startswith("[") for word in argv):
            continue
        environment = {}
        while ASSIGNMENT.match(argv[0]):
            name, _, value = argv.pop(0).partition("=")
            environment[name] = value
        if argv[0] == "ssh":
            argv = argv[2:]
        yield environment, argv


def program_of(argv):
    """
    @return: the name of the program of ours a command line runs (a daemon's
        tapname, C{"bundle"}, C{"query"}), or L{None} for another one
        (C{python -m tvm.exec...}, an example script).
    """
    if argv[0] == "twistd":
        return next((word for word in argv if word in DAEMONS), "twistd")
    if argv[0].startswith("python") and len(argv) > 1 and argv[1].endswith(".pyz"):
        return "bundle"
    if argv[:3] == ["python", "-m", "tvm_rpc.query"] or argv[0] == "tvm-rpc-query":
        return "query"
    return None


def check_command(environment, argv):
    """
    Parse one documented command line as its program would.

    @return: the name of the program checked (see L{program_of}), or L{None}
        for a command this test does not know.
    @raise usage.UsageError: for an option that does not exist, a bad value,
        or a line that fails as written.
    @raise SystemExit: for the query tool's bad arguments (argparse).
    """
    if argv[0] == "twistd":
        config = ServerOptions()
        config.parseOptions(argv[1:])
        if config.subCommand not in DAEMONS:
            raise usage.UsageError(f"not one of our daemons: {config.subCommand}")
        if config["pidfile"] == os.path.abspath(TWISTD_DEFAULT_PIDFILE):
            raise usage.UsageError(
                "twistd writes twistd.pid even with -n: a second daemon in the same"
                " directory stops; say --pidfile= or --pidfile FILE")
        if config.subOptions.get("init") and "PYTHONPATH" not in environment:
            raise usage.UsageError(
                "--init imports by name and twistd does not put the current"
                " directory on sys.path: say PYTHONPATH=.")
        return config.subCommand
    if argv[0].startswith("python") and len(argv) > 1 and argv[1].endswith(".pyz"):
        server_tap.Options().parseOptions(argv[2:])
        return "bundle"
    if argv[:3] == ["python", "-m", "tvm_rpc.query"] or argv[0] == "tvm-rpc-query":
        arguments = argv[3:] if argv[0] == "python" else argv[1:]
        query.parse_args(arguments, environ=environment)
        return "query"
    return None


def documented_commands():
    """@return: C{(file name, line, environment, argv)} for every documented command."""
    found = []
    for path in DOCS:
        for environment, argv in shell_commands(path.read_text()):
            if program_of(argv) is not None:
                found.append((path.name, shlex.join(argv), environment, argv))
    return found


COMMANDS = documented_commands()


@pytest.mark.parametrize("name, line, environment, argv", COMMANDS,
                         ids=[f"{name}: {line}" for name, line, _, _ in COMMANDS])
def test_documented_command_parses(name, line, environment, argv):
    """Every documented command of ours parses with the program's real options."""
    check_command(environment, argv)


def test_every_program_is_documented_and_checked():
    """The blocks hold commands of every daemon, the bundle and the query tool,
    so a change to how blocks are found cannot empty the check above."""
    checked = {check_command(environment, argv) for _, _, environment, argv in COMMANDS}
    assert set(DAEMONS) | {"bundle", "query"} <= checked


@pytest.mark.parametrize("line", [
    "twistd -n rpc-tracker --port 9190",                          # writes twistd.pid
    "twistd -n --pidfile= rpc-server --key rasp --init mydevice",  # not importable
    "twistd -n --pidfile= rpc-tracker --no-such-option",
    "twistd -n --pidfile= rpc-proxy --port notaport",
    "python3 tvm-rpc-server.pyz --no-such-option",
])
def test_check_refuses_lines_that_fail_as_written(line):
    """The check fails on the faults it exists to catch, so the test above can fail."""
    (environment, argv), = shell_commands(f"```sh\n{line}\n```\n")
    with pytest.raises(usage.UsageError):
        check_command(environment, argv)


def test_check_refuses_bad_query_options():
    """The query tool's bad options are caught too."""
    (environment, argv), = shell_commands("```sh\npython -m tvm_rpc.query --json --leases\n```\n")
    with pytest.raises(SystemExit):
        check_command(environment, argv)

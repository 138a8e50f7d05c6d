"""The fenced blocks of README.md and docs/, read as a walkthrough a test can run.

A doc is read top to bottom into I{steps}: its fenced blocks, and the
C{<!-- doc-test: ... -->} comments that say what a block needs and a reader
cannot see. A comment either stands alone and sets up the lab the doc assumes::

    <!-- doc-test: tracker tracker.lab:9190 -->      our tracker at that address
    <!-- doc-test: server rasp3b at 127.0.0.1:9090 -->  our rpc-server of that key (at that port)
    <!-- doc-test: file dense_relu.so -->             the doc's compiled dense + ReLU library
    <!-- doc-test: let HOST=127.0.0.1 KEY=rasp3b -->  placeholders of the doc's commands

or is attached to the block that follows it::

    <!-- doc-test: output of python -m tvm_rpc.query --port 9190 -->  the block is its output

Each block is classified by its info string: C{sh}/C{bash} blocks are run
line by line, C{python} blocks as scripts (or written as the file their first
line names, C{# mydevice.py}), C{text}/C{yaml} are read only, C{json} must
parse. A bare C{```} block is unclassified, and refused.

Documented ports (C{9xxx}) and hosts (C{tracker.lab}, C{0.0.0.0}) are
rewritten to free loopback ports and C{127.0.0.1}, the same way throughout a
doc, so its commands and examples still meet each other.
"""

import re
import shlex

import attrs

#: Info strings of blocks that are read, not run.
READ_ONLY_INFO = {"text", "yaml", "json"}
#: Info strings of blocks run as shell lines.
SHELL_INFO = {"sh", "bash"}
#: A documented port: four digits from 9000, not part of a longer number or version.
PORT = re.compile(r"(?<![\w.])9\d{3}(?![\w.])")
#: Documented hosts, and the loopback address every test uses in their place.
HOSTS = {"tracker.lab": "127.0.0.1", "0.0.0.0": "127.0.0.1"}
DIRECTIVE = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->$")
#: Directives attached to the next block (the others are lab steps).
ATTACHED = ("output of ",)
#: A python block that is a file the reader saves: its first line names it.
FILE_HEADER = re.compile(r"^#\s*([\w.]+\.py)\s*$")


class UnclassifiedBlock(Exception):
    """A fenced block nobody said how to test (bare C{```} or an unknown info string)."""


@attrs.frozen
class Block:
    """
    One fenced block.

    @ivar line: the 1-based line number of its opening fence.
    @ivar info: its info string (C{"sh"}, C{"python"}, C{""}...).
    @ivar text: its body, dedented as far as its fence was indented.
    @ivar directive: the attached C{doc-test} directive, or L{None}.
    """

    line: int
    info: str
    text: str
    directive: str = None

    @property
    def lines(self):
        """@return: the stripped non-empty lines of the body."""
        return [line.strip() for line in self.text.splitlines() if line.strip()]


@attrs.frozen
class LabStep:
    """A standalone directive: part of the lab the doc assumes, in place."""

    line: int
    directive: str


def steps_of(markdown):
    """
    @return: the doc's L{Block}s and L{LabStep}s in order.
    @raise ValueError: for a directive that attaches to no block, or an unknown one.
    """
    steps, pending, fence, body = [], None, None, []
    for number, raw in enumerate(markdown.splitlines(), 1):
        stripped = raw.strip()
        if fence is not None:
            if stripped == "```":
                indent = len(fence[2])
                text = "\n".join(line[indent:] if not line[:indent].strip() else line.lstrip()
                                 for line in body)
                steps.append(Block(fence[0], fence[1], text + "\n", pending and pending[1]))
                pending, fence, body = None, None, []
            else:
                body.append(raw)
            continue
        found = DIRECTIVE.match(stripped)
        if found:
            directive = found.group(1)
            if directive.startswith(ATTACHED):
                pending = (number, directive)
            elif directive.split()[0] in {"tracker", "server", "file", "let"}:
                steps.append(LabStep(number, directive))
            else:
                raise ValueError(f"line {number}: unknown doc-test directive {directive!r}")
        elif stripped.startswith("```"):
            fence = (number, stripped[3:].strip(), raw[:len(raw) - len(raw.lstrip())])
        elif pending and stripped:
            raise ValueError(f"line {pending[0]}: {pending[1]!r} is not followed by a block")
    return steps


def classify(block):
    """
    @return: how a block is tested: C{"shell"}, C{"python"}, C{"python file"},
        C{"output"}, C{"json"} or C{"read"}.
    @raise UnclassifiedBlock: for a block with no known info string.
    """
    if block.directive:
        return block.directive.split()[0]
    if block.info in SHELL_INFO:
        return "shell"
    if block.info == "python":
        return "python file" if FILE_HEADER.match(block.lines[0]) else "python"
    if block.info == "json":
        return "json"
    if block.info in READ_ONLY_INFO:
        return "read"
    raise UnclassifiedBlock(
        f"line {block.line}: a ```{block.info} block nobody classified: say ```sh, "
        "```python, ```text (output, logs, synopses), or add a doc-test directive")


def shell_commands(block):
    """
    @return: C{(line number, line)} of each line of a shell block that is a
        command (blank and comment lines dropped).
    """
    return [(block.line + offset, line.strip())
            for offset, line in enumerate(block.text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")]


def command_text(line):
    """@return: a shell line without its trailing comment, as shell words."""
    return shlex.join(shlex.split(line, comments=True))


def documented_ports(steps):
    """@return: the sorted documented ports named in a doc's runnable blocks and directives."""
    texts = [s.directive for s in steps if isinstance(s, LabStep)]
    for step in steps:
        if isinstance(step, Block) and step.info in SHELL_INFO | {"python"}:
            texts.append(step.text)
        if isinstance(step, Block) and step.directive:
            texts.append(step.directive)
    return sorted({int(port) for text in texts for port in PORT.findall(text)})


@attrs.define
class Rewriter:
    """
    The mechanical rewrite of a doc's text onto this machine: documented
    ports to free ones, documented hosts and the doc's C{let} placeholders
    to their values.

    @ivar ports: documented port -> the free port used in its place.
    @ivar words: placeholder or host -> its value.
    """

    ports: dict
    words: dict = attrs.Factory(lambda: dict(HOSTS))

    def __call__(self, text):
        """@return: C{text} with ports, hosts and placeholders rewritten."""
        text = PORT.sub(lambda m: str(self.ports.get(int(m.group()), m.group())), text)
        for word, value in self.words.items():
            text = re.sub(rf"(?<![\w.-]){re.escape(word)}(?![\w-])", value, text)
        return text

    def back(self, text):
        """@return: C{text} (a program's output) with the free ports named as documented."""
        reverse = {str(free): str(documented) for documented, free in self.ports.items()}
        return re.sub(r"(?<!\d)\d{4,5}(?!\d)", lambda m: reverse.get(m.group(), m.group()), text)


def command_words(line):
    """
    @return: C{(argv, environment)} of a shell line with its leading
        C{NAME=value} assignments and an C{ssh HOST} prefix taken off (the
        command the device would run).
    """
    argv = shlex.split(line, comments=True)
    environment = {}
    while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):
        name, _, value = argv.pop(0).partition("=")
        environment[name] = value
    if argv[:1] == ["ssh"]:
        argv = argv[2:]
    return argv, environment


def daemon_kind(argv):
    """
    @return: what long-running daemon a command starts (C{"rpc-tracker"},
        C{"rpc-server"}, C{"rpc-proxy"} for twistd's and the bundle's,
        C{"tvm"} for one of TVM's), or L{None} for a command that ends.
    """
    if not argv:
        return None
    if argv[0] == "twistd":
        return next((word for word in argv if word in {"rpc-tracker", "rpc-server", "rpc-proxy"}),
                    "twistd")
    if argv[0] in {"python", "python3"} and len(argv) > 1:
        if argv[1].endswith(".pyz"):
            return "rpc-server"
        if argv[1] == "-m" and len(argv) > 2 and argv[2].startswith("tvm.exec.rpc_"):
            return "tvm"
    return None


def option(argv, name):
    """@return: the value of C{--name VALUE} or C{--name=VALUE} in C{argv}, or L{None}."""
    for index, word in enumerate(argv):
        if word == name and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith(name + "="):
            return word.partition("=")[2]
    return None


def loose_output_match(expected, actual):
    """
    @return: whether C{actual} is C{expected} but for the width of blank runs
        (a column padded for a free port's five digits where the doc has four)
        and trailing blanks.
    """
    def normal(text):
        return "\n".join(re.sub(r"\s+", " ", line).rstrip() for line in text.rstrip().splitlines())
    return normal(expected) == normal(actual)

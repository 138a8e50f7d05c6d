"""The systemd units of ``docs/deploy/``: each runs its daemon with options
that exist, checked by parsing its command line with the daemon's real
options (twistd's own, then the plugin's), and restarts on failure."""

import shlex
from pathlib import Path

import pytest
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from tvm_rpc.proxy import tap as proxy_tap
from tvm_rpc.server import tap as server_tap
from tvm_rpc.tracker import tap as tracker_tap

pytestmark = pytest.mark.unit

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy"

#: Each unit, the twistd subcommand it runs and that subcommand's options.
UNITS = {
    "rpc-tracker.service": ("rpc-tracker", tracker_tap.Options),
    "rpc-proxy.service": ("rpc-proxy", proxy_tap.Options),
    "rpc-server.service": ("rpc-server", server_tap.Options),
}
#: The prefix of a commented-out alternative command line.
ALTERNATIVE = "#ExecStart="


def read_unit(path):
    """
    @return: C{(settings, alternatives)}: C{{(section, key): [values]}} of a
        unit file, and the commented-out C{ExecStart} alternatives.
    """
    settings, alternatives, section = {}, [], None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith(ALTERNATIVE):
            alternatives.append(line[len(ALTERNATIVE):])
        elif not line or line.startswith(("#", ";")):
            continue
        elif line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        else:
            key, _, value = line.partition("=")
            settings.setdefault((section, key.strip()), []).append(value.strip())
    return settings, alternatives


def check_command(command, tapname, options_class):
    """
    Parse a unit's command line as the daemon would.

    @return: the daemon's parsed options.
    @raise usage.UsageError: for an option that does not exist or a bad value.
    """
    argv = shlex.split(command)
    if argv[0].endswith("/twistd"):
        config = ServerOptions()
        config.parseOptions(argv[1:])
        assert config["nodaemon"], "systemd runs the daemon in the foreground: twistd -n"
        assert config["pidfile"] == "", "systemd tracks the process: --pidfile= (none)"
        assert config.subCommand == tapname
        assert isinstance(config.subOptions, options_class)
        return config.subOptions
    assert argv[0].endswith("python3") and argv[1].endswith(".pyz"), argv
    assert tapname == "rpc-server", "only the server has a bundle"
    options = options_class()
    options.parseOptions(argv[2:])
    return options


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_unit(unit):
    """One ExecStart (and its alternatives) whose every option exists; a user; restarts on failure."""
    tapname, options_class = UNITS[unit]
    settings, alternatives = read_unit(DEPLOY / unit)
    (exec_start,) = settings[("Service", "ExecStart")]
    for command in [exec_start] + alternatives:
        check_command(command, tapname, options_class)
    assert settings[("Service", "User")] != [""]
    assert settings[("Service", "Restart")] == ["on-failure"]
    assert settings[("Install", "WantedBy")] == ["multi-user.target"]


def test_the_server_unit_offers_the_bundle():
    """The device unit shows the bundle's command line too (checked above like the main one)."""
    _, alternatives = read_unit(DEPLOY / "rpc-server.service")
    assert any(".pyz" in command for command in alternatives)


@pytest.mark.parametrize("command", [
    "/opt/venv/bin/twistd -n --pidfile= rpc-tracker --no-such-option",
    "/opt/venv/bin/twistd -n --pidfile= rpc-tracker --port notaport",
    "/opt/venv/bin/twistd -n --no-such-twistd-option rpc-tracker",
])
def test_check_refuses_what_does_not_exist(command):
    """The check fails on an option the daemon lacks, so the test above can fail."""
    with pytest.raises(usage.UsageError):
        check_command(command, "rpc-tracker", tracker_tap.Options)

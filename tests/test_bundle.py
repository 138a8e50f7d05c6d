"""The device bundle's build (L{tvm_rpc.bundle}): which distributions and files
go in, the archive it writes, and the pieces of its foreground runner that run
without a reactor. The bundle as a running process: C{test_bundle_device}."""

import importlib.metadata
import io
import os
import sys
import types
import zipfile
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import tvm_rpc
from tvm_rpc import partial_tls
from tvm_rpc.bundle import archive, contents, device

pytestmark = pytest.mark.unit

PACKAGE_DIR = os.path.dirname(os.path.abspath(tvm_rpc.__file__))


@attrs.define
class FakeDistribution:
    """The parts of an installed distribution the bundle reads."""

    name: str
    requires: list = attrs.Factory(list)
    requires_python: "str | None" = None
    version: str = "1.0"
    files: "list | None" = attrs.Factory(list)

    @property
    def metadata(self):
        return {"Name": self.name, "Requires-Python": self.requires_python}

    def locate_file(self, path):
        return f"/site/{path}"


def finder(*dists):
    """@return: a C{find} over C{dists} that matches names and fails as C{importlib.metadata} does."""
    by_name = {canonicalize_name(d.name): d for d in dists}

    def find(name):
        try:
            return by_name[canonicalize_name(name)]
        except KeyError:
            raise importlib.metadata.PackageNotFoundError(name) from None

    return find


@pytest.mark.parametrize("line, verdict", [
    ("twisted>=23", "yes"),
    ("idna>=2.5; extra == 'tls'", "no"),
    ("typing_extensions; python_version < '3.0.1'", "older"),
    ("pywin32; platform_system == 'NoSuchSystem'", "no"),
])
def test_needed(line, verdict):
    """Extras are never followed; requirements of older Pythons only are told apart."""
    assert contents.needed(Requirement(line)) == verdict


@pytest.mark.parametrize("specifier, floor", [
    (None, (3, 0)),
    (">=3.10", (3, 10)),
    (">=2.6, !=3.0.*, !=3.1.*, !=3.2.*, !=3.3.*", (3, 4)),
])
def test_oldest_python(specifier, floor):
    assert contents.oldest_python(specifier) == floor


def test_closure_follows_requirements_once():
    """Requirements are followed through metadata, each distribution once, names normalised."""
    dists = finder(
        FakeDistribution("top", ["mid-dle>=1", "leaf", "never; extra == 'x'"], ">=3.9"),
        FakeDistribution("mid_dle", ["leaf>=2"], ">=3.11"),
        FakeDistribution("leaf"),
    )
    found, floor = contents.dependency_closure([Requirement("top")], dists)
    assert [d.name for d in found] == ["top", "mid_dle", "leaf"]
    assert floor == (3, 11)


def test_closure_missing_requirement():
    with pytest.raises(contents.BundleError, match="leaf is needed but not installed"):
        contents.dependency_closure([Requirement("top")], finder(FakeDistribution("top", ["leaf"])))


def test_closure_missing_requirement_of_older_pythons_raises_the_floor():
    """A dependency only older Pythons need, absent here, makes this Python the bundle's floor."""
    dists = finder(FakeDistribution("top", ["backport; python_version < '3.0.1'"]))
    _, floor = contents.dependency_closure([Requirement("top")], dists)
    assert floor == sys.version_info[:2]


@pytest.mark.parametrize("path, wanted", [
    ("pkg/module.py", True),
    ("pkg/sub/__init__.py", True),
    ("pkg/test/test_module.py", False),
    ("pkg/tests/conftest.py", False),
    ("pkg/__pycache__/module.cpython-311.pyc", False),
    ("pkg/data.json", False),
    ("../../bin/tool", False),
    ("pkg-1.0.dist-info/METADATA", True),
    ("pkg-1.0.dist-info/RECORD", False),
])
def test_packed(path, wanted):
    assert contents.packed(path) is wanted


def test_distribution_members_leave_compiled_files_out():
    dist = FakeDistribution("z", files=["z/a.py", "z/_speed.cpython-311-x86_64-linux-gnu.so",
                                        "z/_speed.c"])
    members, compiled = contents.distribution_members(dist)
    assert members == [contents.Member("z/a.py", "/site/z/a.py")]
    assert compiled == ["z/_speed.cpython-311-x86_64-linux-gnu.so"]


def test_distribution_without_record():
    with pytest.raises(contents.BundleError, match="no RECORD"):
        contents.distribution_members(FakeDistribution("z", files=None))


def test_roots_are_the_install_requires_of_this_checkout():
    names = {r.name for r in contents.root_requirements(PACKAGE_DIR)}
    assert {"twisted", "attrs", "zope.interface"} <= names
    assert "autobahn" not in names, "the device side never needs the websocket"


def real_contents():
    return contents.bundle_contents(PACKAGE_DIR)


def test_real_contents():
    """From this environment: tvm_rpc whole, Twisted's runtime closure, only Python source."""
    packed = real_contents()
    names = {m.name for m in packed.members}
    ours = {str(Path(p).relative_to(Path(PACKAGE_DIR).parent).as_posix())
            for p in Path(PACKAGE_DIR).rglob("*.py") if "__pycache__" not in p.parts}
    assert ours <= names
    assert {"twisted/internet/reactor.py", "zope/interface/__init__.py", "attr/__init__.py",
            "constantly/__init__.py", "hyperlink/__init__.py", "automat/__init__.py"} <= names
    assert not any(n.endswith(contents.COMPILED_SUFFIXES) for n in names)
    assert not any({"test", "tests"} & set(n.split("/")[:-1]) for n in names)
    twisted_requires = {Requirement(r).name for r in importlib.metadata.requires("twisted")
                        if contents.needed(Requirement(r)) == "yes"}
    packed_names = {canonicalize_name(name) for name, _ in packed.distributions}
    assert {canonicalize_name(r) for r in twisted_requires} <= packed_names
    assert "autobahn" not in packed_names and "numpy" not in packed_names
    floors = [contents.oldest_python(importlib.metadata.distribution(name).metadata["Requires-Python"])
              for name, _ in packed.distributions]
    assert packed.requires_python == max(floors)


def test_archive(tmp_path):
    """The archive is a zipapp: an interpreter line, the packed files, a __main__ with the floor."""
    target = tmp_path / "b.pyz"
    packed = archive.build_bundle(str(target), PACKAGE_DIR)
    assert target.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.access(target, os.X_OK)
    with zipfile.ZipFile(target) as z:
        names = set(z.namelist())
        main = z.read("__main__.py").decode()
    assert {m.name for m in packed.members} | {"__main__.py"} <= names
    assert f"REQUIRES_PYTHON = {packed.requires_python!r}" in main


def test_main_source_refuses_an_older_python():
    """The generated __main__ stops on a Python older than the floor, before importing tvm_rpc."""
    source = archive.main_source((99, 0))
    with pytest.raises(SystemExit, match="needs Python 99.0 or newer"):
        exec(compile(source, "__main__.py", "exec"), {"__name__": "__main__"})


@given(st.lists(st.text(st.characters(blacklist_characters=os.pathsep), min_size=1)),
       st.text(st.characters(blacklist_characters=os.pathsep), min_size=1))
def test_python_path_with(rest, first):
    """The bundle goes first, once; the rest of the path stays in order."""
    joined = device.python_path_with(first, os.pathsep.join(rest))
    parts = joined.split(os.pathsep)
    assert parts[0] == first and parts.count(first) == 1
    assert parts[1:] == [p for p in rest if p != first]


def test_archive_path():
    """A package imported from a zip names the zip; one from a directory names none."""
    zipped = types.SimpleNamespace(__spec__=types.SimpleNamespace(
        loader=types.SimpleNamespace(archive="x/b.pyz")))
    assert device.archive_path(zipped) == os.path.abspath("x/b.pyz")
    assert device.archive_path(tvm_rpc) is None


def test_bad_options_return_2(capsys):
    assert device.main(["--port", "5", "--port-end", "5"], out=io.StringIO()) == 2
    assert "--port-end must be greater than --port" in capsys.readouterr().err


def spec_finder(*present):
    """@return: a C{find_spec} that finds only the top-level modules C{present}."""
    return lambda name: object() if name in present else None


@pytest.mark.parametrize("present, cached, hidden", [
    (("OpenSSL",), {}, True),                        # Debian's python3-openssl alone
    (("OpenSSL", "service_identity"), {}, False),    # twisted[tls]: TLS works
    ((), {}, False),                                 # no pyOpenSSL: nothing to hide
    (("OpenSSL",), {"OpenSSL": None}, True),          # hidden already
    (("OpenSSL",), {"OpenSSL": types}, False),        # imported already: too late to hide
])
def test_hide_partial_tls(present, cached, hidden):
    """pyOpenSSL without service_identity is hidden, so that Twisted's endpoints import."""
    modules = dict(cached)
    assert partial_tls.hide_partial_tls(spec_finder(*present), modules) is hidden
    assert (modules.get("OpenSSL", types) is None) is hidden

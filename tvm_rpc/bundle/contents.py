"""What goes into the device bundle: tvm_rpc and its pure-Python runtime dependencies.

The dependencies are read from the installed distributions' metadata
(C{importlib.metadata}), starting from tvm_rpc's own C{install_requires} and
following each one's requirements, so the bundle follows whatever Twisted the
building machine has. Of each distribution only its C{.py} files (and its
C{METADATA}, for C{importlib.metadata} lookups) are packed: compiled
extensions cannot be imported from a zip, and the dependencies that ship one
(zope.interface) fall back to pure Python without it. Test packages are left
out: the server never imports them, and they are most of Twisted's size.
"""

import configparser
import importlib.metadata
import os
import sys
from pathlib import PurePosixPath

import attrs
# packaging comes with Twisted (incremental requires it).
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

#: Directory names whose files stay out of the bundle.
SKIPPED_DIRECTORIES = frozenset({"__pycache__", "test", "tests"})
#: Endings of compiled extension modules, which a zip cannot import.
COMPILED_SUFFIXES = (".so", ".pyd", ".dylib")
#: The minor versions of Python 3 tried when finding the oldest one a
#: distribution accepts.
PYTHON3_MINORS = range(0, 40)
#: A marker environment of the oldest Python, to tell requirements that only
#: older Pythons need (such as C{typing_extensions; python_version < "3.10"}).
OLDEST_PYTHON = {"python_version": "3.0", "python_full_version": "3.0.0", "extra": ""}


class BundleError(Exception):
    """The bundle cannot be built (a dependency is missing or unreadable)."""


@attrs.frozen
class Member:
    """
    One file of the bundle.

    @ivar name: its path inside the archive (C{/}-separated).
    @ivar source: the file to copy.
    """

    name: str
    source: str


@attrs.frozen
class Contents:
    """
    Everything the bundle holds.

    @ivar members: the files, tvm_rpc's first.
    @ivar distributions: C{(name, version)} of each packed dependency.
    @ivar left_out: compiled files of dependencies that were not packed.
    @ivar requires_python: the oldest C{(major, minor)} that runs every
        packed distribution.
    """

    members: tuple
    distributions: tuple
    left_out: tuple
    requires_python: tuple


def root_requirements(package_dir):
    """
    tvm_rpc's own runtime requirements (its C{install_requires}).

    Read from the C{setup.cfg} beside the package when it is a checkout, else
    from the installed distribution's metadata.

    @param package_dir: the directory of the C{tvm_rpc} package.
    @return: a list of L{Requirement}s.
    @raise BundleError: when neither can be read.
    """
    setup_cfg = os.path.join(os.path.dirname(package_dir), "setup.cfg")
    if os.path.exists(setup_cfg):
        parser = configparser.ConfigParser()
        parser.read(setup_cfg, encoding="utf-8")
        lines = parser.get("options", "install_requires", fallback="").splitlines()
    else:
        try:
            lines = importlib.metadata.requires("tvm_rpc") or []
        except importlib.metadata.PackageNotFoundError:
            raise BundleError("tvm_rpc's requirements are unknown: no setup.cfg "
                              "beside it and no installed distribution") from None
    return [Requirement(line) for line in lines if line.strip()]


def needed(requirement):
    """
    @return: C{"yes"} when this Python needs C{requirement} (no extra asked),
        C{"older"} when only older Pythons do, C{"no"} otherwise.
    """
    marker = requirement.marker
    if marker is None or marker.evaluate({"extra": ""}):
        return "yes"
    if marker.evaluate(OLDEST_PYTHON):
        return "older"
    return "no"


def oldest_python(specifier):
    """
    @param specifier: a C{Requires-Python} value, or L{None}.
    @return: the oldest C{(3, minor)} it accepts, C{(3, 0)} when it says nothing.
    """
    if not specifier:
        return (3, 0)
    accepted = SpecifierSet(specifier)
    for minor in PYTHON3_MINORS:
        if accepted.contains(f"3.{minor}", prereleases=True):
            return (3, minor)
    raise BundleError(f"no Python 3 accepted by Requires-Python {specifier!r}")


def dependency_closure(roots, find=importlib.metadata.distribution):
    """
    Follow requirements from C{roots} through the installed distributions.

    @param roots: L{Requirement}s to start from.
    @param find: looks up an installed distribution by name.
    @return: C{(distributions, floor)}: the distributions reached, in the
        order first met, and the oldest C{(major, minor)} they need, raised
        to this Python's when a requirement of older Pythons only is not
        installed here to be packed.
    @raise BundleError: when a needed distribution is not installed.
    """
    found = {}
    floor = (3, 0)
    pending = list(roots)
    while pending:
        requirement = pending.pop(0)
        key = canonicalize_name(requirement.name)
        if key in found:
            continue
        verdict = needed(requirement)
        if verdict == "no":
            continue
        try:
            dist = find(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            if verdict == "older":
                floor = max(floor, sys.version_info[:2])
                continue
            raise BundleError(f"{requirement} is needed but not installed") from None
        found[key] = dist
        floor = max(floor, oldest_python(dist.metadata["Requires-Python"]))
        pending.extend(Requirement(line) for line in dist.requires or ())
    return list(found.values()), floor


def packed(path):
    """
    @param path: a file of a distribution, relative to its install directory.
    @return: whether it goes into the bundle.
    """
    parts = PurePosixPath(path).parts
    if not parts or parts[0] == ".." or SKIPPED_DIRECTORIES.intersection(parts[:-1]):
        return False
    if parts[0].endswith(".dist-info"):
        return len(parts) == 2 and parts[1] == "METADATA"
    return parts[-1].endswith(".py")


def distribution_members(dist):
    """
    @return: C{(members, compiled)}: the L{Member}s of C{dist} and the names
        of its compiled files that stay out.
    @raise BundleError: when the distribution lists no files.
    """
    files = dist.files
    if files is None:
        raise BundleError(f"{dist.metadata['Name']} has no RECORD: cannot tell its files")
    members, compiled = [], []
    for path in files:
        name = PurePosixPath(path).as_posix()
        if name.endswith(COMPILED_SUFFIXES):
            compiled.append(name)
        elif packed(name):
            members.append(Member(name, str(dist.locate_file(path))))
    return members, compiled


def package_members(package_dir, name):
    """
    @return: the L{Member}s of the package at C{package_dir}, packed as C{name}
        (its C{.py} files, test directories and caches left out).
    """
    members = []
    for directory, subdirectories, files in os.walk(package_dir):
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_DIRECTORIES)
        relative = os.path.relpath(directory, package_dir)
        for filename in sorted(files):
            if filename.endswith(".py"):
                inner = PurePosixPath(name, *([] if relative == "." else relative.split(os.sep)))
                members.append(Member((inner / filename).as_posix(),
                                      os.path.join(directory, filename)))
    return members


def bundle_contents(package_dir, find=importlib.metadata.distribution):
    """
    Everything the bundle holds.

    @param package_dir: the directory of the C{tvm_rpc} package to pack.
    @param find: looks up an installed distribution by name.
    @return: the L{Contents}.
    @raise BundleError: when a dependency is missing or lists no files.
    """
    members = package_members(package_dir, "tvm_rpc")
    distributions, floor = dependency_closure(root_requirements(package_dir), find)
    names = {member.name for member in members}
    left_out = []
    for dist in distributions:
        dist_members, compiled = distribution_members(dist)
        left_out.extend(compiled)
        for member in dist_members:
            if member.name not in names:
                names.add(member.name)
                members.append(member)
    return Contents(
        members=tuple(members),
        distributions=tuple((d.metadata["Name"], d.version) for d in distributions),
        left_out=tuple(left_out),
        requires_python=floor,
    )

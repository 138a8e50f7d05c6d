"""Writing the device bundle: a zipapp (C{zipapp} from the standard library)."""

import importlib.metadata
import os
import shutil
import tempfile
import zipapp

from .contents import bundle_contents

#: The interpreter line of the bundle, so C{./tvm-rpc-server.pyz} runs too.
INTERPRETER = "/usr/bin/env python3"

#: The bundle's C{__main__}: it checks the Python version before importing
#: anything that would fail on an older one with a less helpful error.
MAIN_TEMPLATE = '''\
"""tvm_rpc's device bundle: runs rpc-server in the foreground (built by python -m tvm_rpc.bundle)."""
import sys

REQUIRES_PYTHON = {requires_python!r}
if sys.version_info[:2] < REQUIRES_PYTHON:
    sys.exit("this bundle needs Python %d.%d or newer (its Twisted does), not %s"
             % (REQUIRES_PYTHON + (sys.version.split()[0],)))

from tvm_rpc.bundle.device import main

sys.exit(main())
'''


def main_source(requires_python):
    """@return: the text of the bundle's C{__main__.py} for a Python floor C{(major, minor)}."""
    return MAIN_TEMPLATE.format(requires_python=tuple(requires_python))


def build_bundle(target, package_dir, find=importlib.metadata.distribution):
    """
    Write the bundle to C{target}.

    @param target: the path of the C{.pyz} to write (replaced if present).
    @param package_dir: the directory of the C{tvm_rpc} package to pack.
    @param find: looks up an installed distribution by name.
    @return: the L{Contents<tvm_rpc.bundle.contents.Contents>} packed.
    @raise BundleError: when a dependency is missing or lists no files.
    """
    contents = bundle_contents(package_dir, find)
    with tempfile.TemporaryDirectory(prefix="tvm_rpc_bundle-") as staging:
        for member in contents.members:
            destination = os.path.join(staging, *member.name.split("/"))
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            shutil.copyfile(member.source, destination)
        with open(os.path.join(staging, "__main__.py"), "w", encoding="utf-8") as f:
            f.write(main_source(contents.requires_python))
        zipapp.create_archive(staging, target, interpreter=INTERPRETER, compressed=True)
    return contents

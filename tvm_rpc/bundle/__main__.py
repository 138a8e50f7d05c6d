"""C{python -m tvm_rpc.bundle -o tvm-rpc-server.pyz}: build the device bundle."""

import argparse
import os
import sys

from .archive import build_bundle
from .contents import BundleError

#: The bundle's default file name.
DEFAULT_TARGET = "tvm-rpc-server.pyz"


def main(argv=None):
    """
    Build the bundle and say what it holds.

    @param argv: the command line (C{sys.argv[1:]} by default).
    @return: the exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m tvm_rpc.bundle",
        description="Build one zipapp holding tvm_rpc and its pure-Python dependencies "
                    "that runs rpc-server with twistd rpc-server's flags: "
                    "python3 tvm-rpc-server.pyz --tracker HOST:PORT --key KEY",
    )
    parser.add_argument("-o", "--output", default=DEFAULT_TARGET,
                        help=f"the file to write (default: {DEFAULT_TARGET})")
    args = parser.parse_args(argv)
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        contents = build_bundle(args.output, package_dir)
    except BundleError as e:
        print(f"cannot build the bundle: {e}", file=sys.stderr)
        return 1
    packed = ", ".join(f"{name} {version}" for name, version in contents.distributions)
    print(f"wrote {args.output} ({os.path.getsize(args.output)} bytes, "
          f"{len(contents.members)} files; needs Python "
          f"{'.'.join(map(str, contents.requires_python))}+)")
    print(f"packed: tvm_rpc, {packed}")
    for name in contents.left_out:
        print(f"left out (compiled: a zip cannot import it): {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

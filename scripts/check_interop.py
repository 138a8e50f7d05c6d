"""Fail unless the interop tests (files tests/test_interop*.py) ran and passed.

Usage: python scripts/check_interop.py JUNIT_XML
"""

import sys
import xml.etree.ElementTree as ET


def main(path):
    ran = skipped = 0
    for case in ET.parse(path).iter("testcase"):
        if "test_interop" not in case.get("classname", ""):
            continue
        if case.find("skipped") is not None:
            skipped += 1
        else:
            ran += 1
    print(f"interop tests: {ran} ran, {skipped} skipped")
    if ran == 0 or skipped:
        print("interop tests must run in CI and never skip", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

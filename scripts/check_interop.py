"""Fail unless the interop tests (files tests/test_interop*.py) ran and passed.

Usage: python scripts/check_interop.py JUNIT_XML

A test marked ``xfail`` ran and failed as its mark expects (pytest's junit
report files it under ``skipped`` with ``type="pytest.xfail"``): it is counted
and listed by name, not taken for a skip. A strict xfail that passes fails the
pytest run itself.
"""

import sys
import xml.etree.ElementTree as ET


def main(path):
    ran = skipped = 0
    expected_failures = []
    for case in ET.parse(path).iter("testcase"):
        if "test_interop" not in case.get("classname", ""):
            continue
        skip = case.find("skipped")
        if skip is None:
            ran += 1
        elif skip.get("type") == "pytest.xfail":
            expected_failures.append(f"{case.get('classname')}::{case.get('name')}: "
                                     f"{skip.get('message', '')}")
        else:
            skipped += 1
    print(f"interop tests: {ran} ran, {len(expected_failures)} failed as expected (xfail), "
          f"{skipped} skipped")
    for line in expected_failures:
        print(f"  xfail {line}")
    if ran == 0 or skipped:
        print("interop tests must run in CI and never skip", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

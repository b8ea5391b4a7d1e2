"""Adds up the results that cargo test, pytest and the cluster smoke test printed in one log and prints one closing line.

Usage: python3 scripts/test-summary.py LOG
"""

import re
import sys


def main(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    passed = failed = skipped = 0
    for ok, bad, ignored in re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", text):
        passed, failed, skipped = passed + int(ok), failed + int(bad), skipped + int(ignored)
    for line in re.findall(r"^=*\s*(.*\d+ (?:passed|failed).*) in [\d.]+s", text, flags=re.M):
        counts = dict((word, int(n)) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)", line))
        passed += counts.get("passed", 0)
        failed += counts.get("failed", 0) + counts.get("error", 0)
        skipped += counts.get("skipped", 0)
    for ok, bad in re.findall(r"^(\d+) passed, (\d+) failed$", text, flags=re.M):
        passed, failed = passed + int(ok), failed + int(bad)
    print(f"tests: {passed} passed, {failed} failed, {skipped} skipped")


if __name__ == "__main__":
    main(sys.argv[1])

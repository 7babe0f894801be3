"""Long fuzz run: the property tests of tests/test_fuzz.py with 10,000 examples each.

CI runs the same tests with 250 examples (about 10 s); run this before a release or after touching
validation, the interceptors or the servicer::

    .venv/bin/python scripts/fuzz.py                  # 10,000 examples per property
    .venv/bin/python scripts/fuzz.py --examples 50000 # more
    .venv/bin/python scripts/fuzz.py -- -x -k raw     # extra pytest arguments after --

Hypothesis prints the smallest failing request it found; the exit status is pytest's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    """Runs tests/test_fuzz.py under the ``fuzz`` hypothesis profile; returns pytest's exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=0, help="examples per property (default: the profile's 10,000)")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (put them after --)")
    args = parser.parse_args(argv)
    env = dict(os.environ, GATEWAY_FUZZ_PROFILE="fuzz")
    if args.examples:
        env["GATEWAY_FUZZ_EXAMPLES"] = str(args.examples)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-q",
        "--hypothesis-show-statistics",
        str(ROOT / "tests" / "test_fuzz.py"),
        *args.pytest_args,
    ]
    return subprocess.call(command, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())

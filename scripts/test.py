"""Set up everything and run the linter and the tests: `python3 scripts/test.py [pytest args]`.

`python3 scripts/test.py --fast` runs only the unit tests (seconds, no services).

Tests run in two parallel sessions (`pytest -n 2`, each test file in one of them, each
session with services of its own): much of an end-to-end test's time is spent waiting
on servers and schedules, which the other session fills. `-n 0` runs them in one.
"""

from __future__ import annotations

import sys

from bootstrap import ensure_env, exec_in_env, venv_bin


def main(argv: list[str]) -> int:
    python = ensure_env()
    ruff = venv_bin("ruff")
    if exec_in_env([ruff, "check", "."]) or exec_in_env([ruff, "format", "--check", "."]):
        return 1
    if "--fast" in argv:
        argv = [a for a in argv if a != "--fast"] + ["-m", "not e2e and not slow and not gpu"]
    if not any(a.startswith(("-n", "--numprocesses")) for a in argv):
        # modules in the order conftest.py gives (the slowest first)
        argv = ["-n", "2", "--dist", "loadfile", "--no-loadscope-reorder", *argv]
    return exec_in_env([python, "-m", "pytest", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Run a benchmark from a fresh clone: `python3 scripts/bench.py NAME [ARGS]`.

Sets up the environment as the tests do (scripts/bootstrap.py), then runs
`bench/NAME.py ARGS` with it (`NAME` without `.py`: serve_bench, policy_bench,
gate_bench, train_bench, export_bench, registry_sim). Each benchmark's docstring says
what it measures and which arguments it takes.
"""

from __future__ import annotations

import sys

from bootstrap import ROOT, ensure_env, exec_in_env


def main(argv: list[str]) -> int:
    benches = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "noop_server")
    if not argv or argv[0] not in benches:
        print(f"usage: python3 scripts/bench.py NAME [ARGS]; NAME is one of {', '.join(benches)}")
        return 2
    python = ensure_env()
    return exec_in_env([python, ROOT / "bench" / f"{argv[0]}.py", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

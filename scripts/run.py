"""Set up everything and run the pipeline on the embedded defaults: `python3 scripts/run.py`.

Creates the environment, starts the local stack (PostgreSQL, MLflow, Prefect),
seeds synthetic training data when the table is empty, and shows what is there.
Settings come from the environment and `.env` (see .env.example).
"""

from __future__ import annotations

import sys

from bootstrap import ensure_env, exec_in_env, venv_bin


def main() -> int:
    ensure_env()
    valifi = venv_bin("valifi")
    steps = [
        [valifi, "stack", "up"],
        [valifi, "seed-data", "--rows", "10000", "--days", "7", "--if-empty"],
        [valifi, "stack", "status"],
    ]
    for step in steps:
        rc = exec_in_env(step)
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())

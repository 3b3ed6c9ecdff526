"""Set up everything and run the pipeline on the embedded defaults: `python3 scripts/run.py`.

Creates the environment, starts the local stack (PostgreSQL, MLflow, Prefect),
seeds synthetic training data when the table is empty, and runs the `train` flow
once: export, validate, train, gate, register and promote. Settings come from the
environment and `.env` (see .env.example).
"""

from __future__ import annotations

import os
import sys

from bootstrap import ensure_env, exec_in_env, venv_bin


def main() -> int:
    ensure_env()
    # The seeded data comes from the synthetic generator: report true policy values too.
    os.environ.setdefault("VALIFI_SYNTHETIC_GROUND_TRUTH", "true")
    valifi = venv_bin("valifi")
    steps = [
        [valifi, "stack", "up"],
        [valifi, "seed-data", "--rows", "10000", "--days", "7", "--if-empty"],
        [valifi, "train"],
        [valifi, "stack", "status"],
    ]
    for step in steps:
        rc = exec_in_env(step)
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Set up everything and run the pipeline on the embedded defaults: `python3 scripts/run.py`.

Creates the environment, starts the local stack (PostgreSQL, MLflow, Prefect),
seeds synthetic training data when the table is empty, runs the `train` flow once
(export, validate, train, gate, register, promote), deploys it as `train/nightly`,
and starts the Prefect worker and the agent server. Settings come from the
environment and `.env` (see .env.example). `valifi stack down` stops it all.
"""

from __future__ import annotations

import os
import sys

from bootstrap import ensure_env, exec_in_env, venv_bin


def main() -> int:
    ensure_env()
    # The seeded data comes from the synthetic generator: report true policy values too.
    os.environ.setdefault("VALIFI_TRAIN_GROUND_TRUTH", "synthetic")
    valifi = venv_bin("valifi")
    steps = [
        [valifi, "stack", "up"],
        [valifi, "seed-data", "--rows", "10000", "--days", "7", "--if-empty"],
        [valifi, "train"],
        [valifi, "deploy"],
        [valifi, "stack", "up", "--apps"],
        [valifi, "health", "--require-model"],
        [valifi, "stack", "status"],
    ]
    for step in steps:
        rc = exec_in_env(step)
        if rc != 0:
            return rc
    print(NEXT)
    return 0


NEXT = """
Everything runs. Try:
  curl -s -X POST http://127.0.0.1:8000/predict -H 'Content-Type: application/json' \\
    -d '{"task": "Analyze AAPL stock and suggest trade", "agent_type": "trading_advanced",
         "context": {"symbol": "AAPL", "indicators": {"rsi": 27.5, "volatility": 0.2}}}'
  .venv/bin/prefect deployment run train/nightly      # a training run now, by the worker
  .venv/bin/valifi rollback --reason "..."            # Production back to the previous version
UIs: MLflow http://127.0.0.1:5000 (model valifi-agent, alias Production),
     Prefect http://127.0.0.1:4200 (deployment train/nightly).
Stop everything: .venv/bin/valifi stack down
"""


if __name__ == "__main__":
    sys.exit(main())

"""A registry for the TypeScript client's tests, when they run on their own.

    python -m tests.client_fixture

Starts an MLflow server of its own (in a throw-away data folder), trains and
promotes a small model, prints one JSON line (tracking_uri, model, empty_model: a
name with no Production version) and keeps the server until its stdin closes.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

MODEL = "valifi-agent-client-tests"


def main() -> int:
    from core.registry import Registry
    from model.synthetic import World, write_snapshot
    from valifi.experiments import own_mlflow, register, train

    with tempfile.TemporaryDirectory(prefix="valifi-client-") as tmp, own_mlflow(tmp) as uri:
        root = Path(tmp)
        snap = write_snapshot(root / "snap", 1500, World(seed=1))
        out = train(snap, root / "train", 1, "--max-epochs", "2")
        version = register(uri, MODEL, out, snap)
        Registry(uri, MODEL).promote(version, "client tests")
        info = {"tracking_uri": uri, "model": MODEL, "empty_model": f"{MODEL}-unpromoted"}
        print(json.dumps(info), flush=True)
        sys.stdin.read()  # until the tests end
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A registry for the TypeScript client's tests, when they run on their own.

    python -m tests.client_fixture

Starts an MLflow server of its own (in a throw-away data folder), trains and
promotes a small model, prints one JSON line (tracking_uri, model, empty_model: a
name with no Production version) and keeps the server until its stdin closes.
"""

from __future__ import annotations

import json
import sys

MODEL = "valifi-agent-client-tests"


def main() -> int:
    from core.registry import Registry
    from tests.helpers import _SESSION_DIR, own_mlflow, register_small

    with own_mlflow() as uri:
        version = register_small(uri, MODEL, _SESSION_DIR / "train", seed=1)
        Registry(uri, MODEL).promote(version, "client tests")
        info = {"tracking_uri": uri, "model": MODEL, "empty_model": f"{MODEL}-unpromoted"}
        print(json.dumps(info), flush=True)
        sys.stdin.read()  # until the tests end
    return 0


if __name__ == "__main__":
    sys.exit(main())

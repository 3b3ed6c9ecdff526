"""Load a registered version in this (fresh) process and verify its canary set.

    python -m core.loadcheck valifi-agent 3      (MLFLOW_TRACKING_URI from the environment)

Loads through the pyfunc flavour, as `mlflow models serve` would; exits non-zero
with the reason on the last line of stderr when it cannot load or verify.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    name, version = argv
    try:
        import mlflow.pyfunc

        pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        err = pyfunc.unwrap_python_model().model.verify()
    except Exception as exc:  # the reason is the product of this command
        print(f"{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    print(f"{name} v{version} loaded; canary max error {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

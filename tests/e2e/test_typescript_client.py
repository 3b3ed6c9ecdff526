"""The TypeScript client's own tests (`npm test` in clients/typescript), against live
agent servers those tests start, on this session's MLflow with a promoted model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT, register_small

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "valifi-agent-ts-client-tests"
CLIENT = ROOT / "clients" / "typescript"


def _npm(*args: str, env: dict | None = None, timeout: float = 600):
    return subprocess.run(
        ["npm", *args],
        cwd=CLIENT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.skipif(shutil.which("npm") is None, reason="Node.js and npm are not installed")
def test_npm_test_passes_against_live_servers(stack_env, tmp_path):
    from core.registry import Registry

    uri = stack_env["MLFLOW_TRACKING_URI"]
    version = register_small(uri, MODEL, tmp_path, seed=1)
    Registry(uri, MODEL).promote(version, "TypeScript client tests")
    installed = _npm("ci", "--no-audit", "--no-fund")
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    r = _npm(
        "test",
        env={
            "MLFLOW_TRACKING_URI": uri,
            "VALIFI_TEST_MODEL": MODEL,
            "VALIFI_TEST_EMPTY_MODEL": f"{MODEL}-unpromoted",
            "VALIFI_PYTHON": sys.executable,
        },
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    # Node's runner reports its counts: every test ran, none failed or was skipped
    assert "# fail 0" in out and "# skipped 0" in out, out[-3000:]
    assert "# pass 10" in out, out[-3000:]  # the reward test too: the stack has a database

"""Shared set-up for scripts/run.py and scripts/test.py: only the standard library here.

Creates `.venv` beside the project, installs torch first (a CPU build where the
machine offers one, so that pip does not pull a multi-GB CUDA build through a
dependency), then the project with its dev extras. A stamp of pyproject.toml
skips the install when nothing changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("VALIFI_VENV", ROOT / ".venv"))
# The torch release the project is tested with; override for another build.
TORCH_SPEC = os.environ.get("VALIFI_TORCH_SPEC", "torch==2.13.0")


def venv_bin(name: str) -> Path:
    return VENV / ("Scripts" if os.name == "nt" else "bin") / name


def run(cmd: list[str | Path], **kw) -> None:
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def ensure_env() -> Path:
    """Create and fill the virtual environment when needed; returns its python."""
    if sys.version_info < (3, 11):  # noqa: UP036 - users may start this with an old python3
        sys.exit(f"Python 3.11 or newer is needed; this is {sys.version.split()[0]}")
    python = venv_bin("python")
    if not python.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".valifi-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH_SPEC.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return python
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run([*pip, "--upgrade", "pip"])
    run([*pip, TORCH_SPEC])
    run([*pip, "-e", ".[dev]"])
    stamp.write_text(want)
    return python


def exec_in_env(args: list[str | Path]) -> int:
    """Run a command with the venv's bin first on PATH; returns its exit status."""
    env = {**os.environ, "PATH": f"{venv_bin('')}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("PYTHONUNBUFFERED", "1")
    print("+ " + " ".join(str(a) for a in args), flush=True)
    return subprocess.run([str(a) for a in args], cwd=ROOT, env=env).returncode

"""The MLflow registry: `valifi-agent` versions, their lineage, and the `Production` alias.

Every version carries lineage tags (snapshot sha256, rows, window, git commit,
config, gate decision and reasons). Every move of `Production` — by the flow,
`valifi promote`, `valifi rollback` or the automatic rollback — is recorded as a
registered-model tag `audit.<UTC time>` (from, to, when, why, by), and on the
version it moved to: both show in the MLflow UI. A move made by hand in the UI is
followed by the server all the same; it simply has no audit tag.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mlflow import MlflowClient

MODEL_NAME = "valifi-agent"
ALIAS = "Production"
EXPERIMENT = "valifi-agent-training"
PYFUNC_FILE = Path(__file__).with_name("agent_pyfunc.py")
MODEL_PACKAGE = Path(__file__).resolve().parents[1] / "model"


class RegistryError(RuntimeError):
    """A registry operation was refused; the message says why."""


def client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def champion(c: MlflowClient, name: str = MODEL_NAME) -> ModelVersion | None:
    """The version `Production` points at, or None (no model promoted yet)."""
    try:
        return c.get_model_version_by_alias(name, ALIAS)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def download(tracking_uri: str, version: str, dst: Path, name: str = MODEL_NAME) -> Path:
    """Download a version's model; returns the folder of its agent artifact."""
    import mlflow.artifacts

    import mlflow

    mv = client(tracking_uri).get_model_version(name, str(version))
    # `models:/` URIs resolve through the process-wide registry URI, not the argument below
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(dst), tracking_uri=tracking_uri
    )
    agent = agent_dir(Path(local))
    if agent is None:
        raise RegistryError(f"version {version} has no agent artifact at {mv.source}")
    return agent


def agent_dir(model_dir: Path) -> Path | None:
    """The agent artifact inside a downloaded pyfunc model folder (from its MLmodel file)."""
    import yaml

    try:
        spec = yaml.safe_load((model_dir / "MLmodel").read_text())
        rel = spec["flavors"]["python_function"]["artifacts"]["agent"]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    path = model_dir / rel
    return path if path.is_dir() else None


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=MODEL_PACKAGE.parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def whoami() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _flat(prefix: str, d: dict) -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flat(f"{key}.", v) if isinstance(v, dict) else {key: v}
    return out


def log_and_register(
    tracking_uri: str,
    train_out: Path,
    snapshot: Path,
    gate: dict,
    lineage: dict,
    name: str = MODEL_NAME,
) -> ModelVersion:
    """Log the run (params, metrics, model, Data Docs, TensorBoard logs) and register it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    mlflow.set_experiment(EXPERIMENT)
    result = json.loads((train_out / "result.json").read_text())
    with mlflow.start_run(run_name=f"train-{snapshot.name}") as run:
        mlflow.log_params({k: str(v)[:500] for k, v in _flat("", result["config"]).items()})
        numeric = {
            k: float(v)
            for k, v in result["metrics"].items()
            if isinstance(v, int | float) and v == v
        }
        mlflow.log_metrics(numeric)
        mlflow.log_dict(gate, "gate.json")
        if (snapshot / "validation").is_dir():
            mlflow.log_artifacts(str(snapshot / "validation"), "data_docs")
        mlflow.log_artifact(str(snapshot / "manifest.json"), "snapshot")
        mlflow.log_artifacts(str(train_out / "runs"), "tensorboard")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={"agent": str(train_out / "artifact")},
            code_paths=[str(MODEL_PACKAGE)],
            pip_requirements=["torch", "safetensors", "tokenizers", "numpy", "pandas", "lightning"],
        )
        tags = {**lineage, "mlflow_run_id": run.info.run_id}
        mv = mlflow.register_model(
            info.model_uri, name, tags={k: str(v)[:4900] for k, v in tags.items()}
        )
    return mv


def load_check(
    tracking_uri: str, version: str, name: str = MODEL_NAME, timeout: float = 300
) -> str:
    """Load the version from the registry in a fresh process and check its canaries.

    Raises RegistryError with the reason when it cannot load or verify.
    """
    cmd = [sys.executable, "-m", "flows.loadcheck", name, str(version)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=MODEL_PACKAGE.parent
    )
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise RegistryError(f"load check of {name} v{version} failed: {tail}")
    return r.stdout.strip()


def move_alias(
    c: MlflowClient, version: str, reason: str, by: str, action: str, name: str = MODEL_NAME
) -> dict:
    """Point `Production` at `version` (which must exist) and record the move."""
    mv = c.get_model_version(name, str(version))  # raises if it does not exist
    current = champion(c, name)
    now = datetime.now(UTC)
    record = {
        "action": action,
        "from": current.version if current else None,
        "to": mv.version,
        "when": now.isoformat(timespec="seconds"),
        "why": reason,
        "by": by,
    }
    c.set_registered_model_alias(name, ALIAS, mv.version)
    c.set_registered_model_tag(
        name, f"audit.{now.strftime('%Y%m%dT%H%M%S.%fZ')}", json.dumps(record)
    )
    c.set_model_version_tag(name, mv.version, "production.last_move", json.dumps(record))
    return record


def audit(c: MlflowClient, name: str = MODEL_NAME) -> list[dict]:
    """Recorded moves of `Production`, oldest first."""
    tags = c.get_registered_model(name).tags
    return [json.loads(tags[k]) for k in sorted(tags) if k.startswith("audit.")]


def previous_production(c: MlflowClient, name: str = MODEL_NAME) -> str | None:
    """The version `Production` pointed at before it moved to the current one."""
    current = champion(c, name)
    for record in reversed(audit(c, name)):
        if current is not None and record["to"] == current.version and record["from"]:
            return record["from"]
    return None


def promote(
    tracking_uri: str,
    version: str,
    reason: str,
    by: str | None = None,
    action: str = "promote",
    name: str = MODEL_NAME,
) -> dict:
    """Move `Production` to `version` after the load check (for people and the flow)."""
    c = client(tracking_uri)
    try:
        c.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"{name} has no version {version}") from exc
    load_check(tracking_uri, str(version), name)
    return move_alias(c, str(version), reason, by or whoami(), action, name)


def rollback(
    tracking_uri: str,
    reason: str,
    to: str | None = None,
    by: str | None = None,
    name: str = MODEL_NAME,
) -> dict:
    """Move `Production` back: to `to`, or to the version it held before the current one."""
    c = client(tracking_uri)
    target = to or previous_production(c, name)
    if target is None:
        raise RegistryError("no previous Production version is recorded; pass --to VERSION")
    return promote(tracking_uri, target, reason, by, "rollback", name)


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="valifi-registry-"))

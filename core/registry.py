"""The MLflow registry: `valifi-agent` versions, their lineage, and the `Production` alias.

The one home of registry logic: the flow, the agent server and the `valifi`
command all go through `Registry`.

- Versions are downloaded into a cache keyed by version *and* run id, so a
  registry that was reset can never be served an old "v1" from the cache.
  Downloads land in a folder of their own and are renamed into place; nothing
  here deletes a folder another process may be reading.
- `register` is idempotent: the caller names the attempt (`run_key`), and a retry
  finds the run and the version it already created.
- Every move of `Production` (and of `Challenger`, the version scored in shadow) is a
  check-then-move: the caller states the version it expects the alias to hold, and
  a move is refused (`AliasMoved`) when it holds another. The audit record
  (registered-model tag `audit.<UTC time>`, naming the alias) is written *before*
  the alias moves, as `pending`, and marked `done` after, so a retried move finds
  its own record and never records a false `from`.
  A move made by hand in the MLflow UI is followed by the server all the same;
  it simply has no audit record.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from core.settings import ALIAS, CHALLENGER
from model.result import TrainResult
from model.snapshot import DOCS, MANIFEST

EXPERIMENT = "valifi-agent-training"
MODEL_PACKAGE = Path(__file__).resolve().parents[1] / "model"
# What `mlflow models serve` runs: serving code, logged with the model by its path (never
# imported here); it imports only the `model` package, logged beside it.
PYFUNC_FILE = MODEL_PACKAGE.parent / "serving" / "pyfunc.py"
# What loading and scoring an artifact imports (model.artifact, model.decision): no
# Lightning, which only training needs
SERVING_REQUIREMENTS = ("torch", "safetensors", "tokenizers", "numpy", "pandas", "pyarrow")
RUN_KEY_TAG = "valifi.run_key"
MODEL_URI_TAG = "valifi.model_uri"
_UNSET = object()


class RegistryError(RuntimeError):
    """A registry operation was refused; the message says why."""


class AliasMoved(RegistryError):
    """The alias no longer holds the version the caller expected: nothing moved."""

    def __init__(
        self, expected: str | None, actual: str | None, wanted: str | None, alias: str = ALIAS
    ):
        self.expected, self.actual = expected, actual
        to = f"moving it to v{wanted}" if wanted else "removing it"
        super().__init__(
            f"{alias} holds {_v(actual)}, not {_v(expected)} as expected: "
            f"not {to} (another move happened meanwhile)"
        )


def _v(version: str | None) -> str:
    return f"v{version}" if version else "no version"


@dataclass(frozen=True)
class Version:
    """One registered version, as the registry knows it now."""

    version: str
    run_id: str | None
    source: str = field(default="", compare=False)  # where its files are; not identity

    @property
    def cache_key(self) -> str:
        return f"{self.version}-{self.run_id or 'norun'}"


def whoami() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


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


def _flat(prefix: str, d: dict) -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _flat(f"{key}.", v) if isinstance(v, dict) else {key: v}
    return out


class Registry:
    """`Production` and the versions of one registered model on one tracking server."""

    def __init__(self, tracking_uri: str, name: str):
        from mlflow import MlflowClient

        self.uri, self.name = tracking_uri, name
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # -- reading ------------------------------------------------------------------
    def champion(self) -> Version | None:
        """The version `Production` points at, or None (no model promoted yet)."""
        return self.alias(ALIAS)

    def challenger(self) -> Version | None:
        """The version `Challenger` points at (scored in shadow), or None."""
        return self.alias(CHALLENGER)

    def alias(self, alias: str) -> Version | None:
        """The version `alias` points at, or None."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return Version(str(mv.version), mv.run_id, mv.source)

    def version(self, version: str) -> Version:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(self.name, str(version))
        except MlflowException as exc:
            raise RegistryError(f"{self.name} has no version {version}") from exc
        return Version(str(mv.version), mv.run_id, mv.source)

    def versions(self) -> list[Version]:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name='{self.name}'")
        except MlflowException:
            return []
        return sorted(
            (Version(str(m.version), m.run_id, m.source) for m in found),
            key=lambda v: int(v.version),
        )

    def rejected_in_a_row(self) -> list[str]:
        """The newest versions, oldest first, that the gate rejected one after another."""
        found = self.client.search_model_versions(f"name='{self.name}'")
        out = []
        for mv in sorted(found, key=lambda m: -int(m.version)):
            if (mv.tags or {}).get("gate_decision") != "reject":
                break
            out.append(str(mv.version))
        return out[::-1]

    def download(self, version: Version, cache: Path) -> Path:
        """The version's agent artifact, downloaded once into `cache/<version>-<run id>`.

        Safe for several processes at once: each downloads into a folder of its own
        and renames it into place; the first to finish wins, the others use theirs.
        """
        final = Path(cache) / version.cache_key
        if (final / "agent").is_dir():
            return final / "agent"
        Path(cache).mkdir(parents=True, exist_ok=True)
        mine = Path(tempfile.mkdtemp(prefix=f".{version.cache_key}-", dir=cache))
        try:
            agent = self._download(version.version, mine / "download")
            os.rename(agent, mine / "agent")
            shutil.rmtree(mine / "download", ignore_errors=True)
            # another process may have finished first: its copy is as good
            with contextlib.suppress(OSError):
                os.rename(mine, final)
        finally:
            if mine.exists():
                shutil.rmtree(mine, ignore_errors=True)
        return final / "agent"

    def _download(self, version: str, dst: Path) -> Path:
        import mlflow.artifacts

        import mlflow

        # `models:/` URIs resolve through the process-wide registry URI, not the argument
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{self.name}/{version}", dst_path=str(dst), tracking_uri=self.uri
        )
        agent = agent_dir(Path(local))
        if agent is None:
            raise RegistryError(f"version {version} of {self.name} has no agent artifact")
        return agent

    # -- registering --------------------------------------------------------------
    def register(
        self, result: TrainResult, snapshot: Path, gate: dict, lineage: dict, run_key: str
    ) -> Version:
        """Log the run (params, metrics, model, Data Docs, TensorBoard logs) and register it.

        Idempotent per `run_key`: a retry returns the version an earlier attempt created,
        or registers the model an earlier attempt logged, never a second run or version.
        """
        import mlflow

        tags = {k: str(v)[:4900] for k, v in {**lineage, RUN_KEY_TAG: run_key}.items()}
        found = self.client.search_model_versions(
            f"name='{self.name}' and tags.`{RUN_KEY_TAG}` = '{run_key}'"
        )
        if found:
            mv = min(found, key=lambda m: int(m.version))
            return Version(str(mv.version), mv.run_id, mv.source)
        run_id, model_uri = self._logged(run_key) or self._log(result, snapshot, gate, run_key)
        mlflow.set_registry_uri(self.uri)
        mv = mlflow.register_model(model_uri, self.name, tags={**tags, "mlflow_run_id": run_id})
        return Version(str(mv.version), run_id, mv.source)

    def _logged(self, run_key: str) -> tuple[str, str] | None:
        """(run id, model URI) of a finished run an earlier attempt logged, if any."""
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            return None
        runs = self.client.search_runs(
            [exp.experiment_id],
            f"tags.`{RUN_KEY_TAG}` = '{run_key}' and attributes.status = 'FINISHED'",
        )
        for run in runs:
            if uri := run.data.tags.get(MODEL_URI_TAG):
                return run.info.run_id, uri
        return None

    def _log(self, result: TrainResult, snapshot: Path, gate: dict, run_key: str):
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        mlflow.set_experiment(EXPERIMENT)
        with mlflow.start_run(run_name=f"train-{snapshot.name}", tags={RUN_KEY_TAG: run_key}) as r:
            flat = _flat("", result.config)
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
            mlflow.log_metrics(result.finite_metrics())
            mlflow.log_dict(gate, "gate.json")
            if (snapshot / DOCS).is_dir():
                mlflow.log_artifacts(str(snapshot / DOCS), "data_docs")
            mlflow.log_artifact(str(snapshot / MANIFEST), "snapshot")
            if result.runs.is_dir():
                mlflow.log_artifacts(str(result.runs), "tensorboard")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_FILE),
                artifacts={"agent": str(result.artifact)},
                code_paths=[str(MODEL_PACKAGE)],
                pip_requirements=list(SERVING_REQUIREMENTS),
            )
            mlflow.set_tag(MODEL_URI_TAG, info.model_uri)  # last: marks the run complete
        return r.info.run_id, info.model_uri

    def run_url(self, run_id: str) -> str:
        exp = self.client.get_run(run_id).info.experiment_id
        return f"{self.uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"

    def version_url(self, version: str) -> str:
        return f"{self.uri.rstrip('/')}/#/models/{self.name}/versions/{version}"

    # -- checking -----------------------------------------------------------------
    def load_check(self, version: str, timeout: float = 300) -> str:
        """Load the version from the registry in a fresh process and check its canaries.

        Raises RegistryError with the reason when it cannot load or verify.
        """
        cmd = [sys.executable, "-m", "core.loadcheck", self.name, str(version)]
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.uri}
        try:
            r = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                cwd=MODEL_PACKAGE.parent,
            )
        except subprocess.TimeoutExpired as exc:
            raise RegistryError(f"load check of {self.name} v{version} timed out") from exc
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise RegistryError(f"load check of {self.name} v{version} failed: {tail}")
        return r.stdout.strip()

    # -- moving Production ----------------------------------------------------------
    def audit(self, include_pending: bool = False, alias: str | None = ALIAS) -> list[dict]:
        """Recorded moves of `alias` (None: of every alias), oldest first (completed ones
        unless asked). Records written before there was a Challenger are Production's."""
        tags = self.client.get_registered_model(self.name).tags
        records = [json.loads(tags[k]) | {"key": k} for k in sorted(tags) if k.startswith("audit.")]
        return [
            r
            for r in records
            if (include_pending or r.get("state", "done") == "done")
            and (alias is None or r.get("alias", ALIAS) == alias)
        ]

    def move(
        self,
        to: str | None,
        expected: str | None,
        reason: str,
        by: str,
        action: str,
        move_id: str | None = None,
        alias: str = ALIAS,
    ) -> dict:
        """Point `alias` at `to` (None: remove it) if it still holds `expected`; record
        the move.

        `move_id` names this move across retries: a retry after any partial failure
        completes the same move and its same audit record.
        """
        target = self.version(to).version if to is not None else None
        move_id = move_id or uuid.uuid4().hex
        mine = next((r for r in self.audit(True, alias) if r.get("id") == move_id), None)
        current = self.alias(alias)
        now_at = current.version if current else None
        if mine is None:
            if now_at != expected:
                raise AliasMoved(expected, now_at, target, alias)
            now = datetime.now(UTC)
            mine = {
                "id": move_id,
                "alias": alias,
                "action": action,
                "from": now_at,
                "to": target,
                "when": now.isoformat(timespec="seconds"),
                "why": reason,
                "by": by,
                "state": "pending",
                "key": f"audit.{now.strftime('%Y%m%dT%H%M%S.%fZ')}",
            }
            self._write(mine)
        elif mine["state"].startswith("abandoned"):
            raise AliasMoved(mine["from"], now_at, target, alias)
        elif mine["state"] != "done" and now_at not in (mine["from"], mine["to"]):
            # someone else moved it between this move's tries
            self._write(mine | {"state": f"abandoned: {alias} moved to {_v(now_at)}"})
            raise AliasMoved(mine["from"], now_at, target, alias)
        if mine["state"] != "done":
            if now_at != target:
                if target is None:
                    self.client.delete_registered_model_alias(self.name, alias)
                else:
                    self.client.set_registered_model_alias(self.name, alias, target)
            mine = mine | {"state": "done"}
            self._write(mine)
        record = {k: v for k, v in mine.items() if k != "key"}
        if target is not None:
            self.client.set_model_version_tag(
                self.name, target, f"{alias.lower()}.last_move", json.dumps(record)
            )
        return mine

    def _write(self, record: dict) -> None:
        body = {k: v for k, v in record.items() if k != "key"}
        self.client.set_registered_model_tag(self.name, record["key"], json.dumps(body))

    def promote(
        self,
        version: str,
        reason: str,
        by: str | None = None,
        expected: object = _UNSET,
        action: str = "promote",
        move_id: str | None = None,
        alias: str = ALIAS,
    ) -> dict:
        """Load-check `version`, then move `alias` (Production) to it.

        `expected`: the version the caller believes the alias holds (None: none);
        unset, what it holds when this call starts, so a move made during the load
        check is never overwritten.
        """
        target = self.version(version).version
        if expected is _UNSET:
            current = self.alias(alias)
            expected = current.version if current else None
        self.load_check(target)
        return self.move(target, expected, reason, by or whoami(), action, move_id, alias)

    def clear(
        self,
        alias: str,
        reason: str,
        by: str | None = None,
        expected: object = _UNSET,
        move_id: str | None = None,
    ) -> dict | None:
        """Remove `alias` (the Challenger: the shadow stops), audited; None when it was
        not set."""
        if expected is _UNSET:
            current = self.alias(alias)
            if current is None:
                return None
            expected = current.version
        return self.move(None, expected, reason, by or whoami(), "clear", move_id, alias)

    def rollback_target(self) -> str | None:
        """Where a rollback goes: the newest version that served as `Production` before
        the current one and was never rolled back from."""
        records = self.audit()
        if not records:
            return None
        current = self.champion()
        skip = {r["from"] for r in records if r["action"] == "rollback"}
        skip.add(current.version if current else None)
        held = [records[0]["from"], *(r["to"] for r in records)]
        return next((v for v in reversed(held) if v and v not in skip), None)

    def rollback(
        self,
        reason: str,
        to: str | None = None,
        by: str | None = None,
        expected: object = _UNSET,
        move_id: str | None = None,
    ) -> dict:
        """Move `Production` back: to `to`, or to `rollback_target()`."""
        target = to or self.rollback_target()
        if target is None:
            raise RegistryError(
                "no earlier Production version that was not rolled back from is recorded; "
                "pass --to VERSION"
            )
        return self.promote(target, reason, by, expected, "rollback", move_id)

"""What one training process hands back: written by rank 0 as `OUT/result.json`, read
only through `TrainResult.read` (by the flow, the registry and the tests)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

FILE = "result.json"


@dataclass(frozen=True)
class TrainResult:
    artifact: Path  # the agent artifact folder (see model.artifact)
    runs: Path  # TensorBoard logs
    metrics: dict  # holdout metrics and training figures (floats and counts)
    config: dict  # model, train, snapshot and trainer sections

    @property
    def train_config(self) -> dict:
        return self.config["train"]

    def finite_metrics(self) -> dict[str, float]:
        """Numeric metrics that are finite, as floats (what a tracking server accepts)."""
        return {
            k: float(v)
            for k, v in self.metrics.items()
            if isinstance(v, int | float)
            and not isinstance(v, bool)
            and v == v
            and abs(v) != float("inf")
        }

    def write(self, out: Path) -> Path:
        """Write `OUT/result.json`. Paths inside `out` are kept relative to it, so the
        folder can be moved or copied and still names its own artifact."""
        paths = {"artifact": _within(self.artifact, out), "runs": _within(self.runs, out)}
        doc = asdict(self) | paths
        tmp = Path(out) / f".{FILE}.tmp"
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, Path(out) / FILE)
        return Path(out) / FILE

    @classmethod
    def read(cls, out: Path) -> TrainResult:
        """The result in training output folder `out`; FileNotFoundError if training did
        not finish there."""
        doc = json.loads((Path(out) / FILE).read_text())
        # relative paths are inside `out`; absolute ones (older results) stay as written
        artifact, runs = (Path(out) / doc["artifact"], Path(out) / doc["runs"])
        return cls(artifact, runs, doc["metrics"], doc["config"])


def _within(path: Path, out: Path) -> str:
    """`path` relative to `out` when it lies inside it, else absolute."""
    path, out = Path(path).absolute(), Path(out).absolute()
    return str(path.relative_to(out)) if path.is_relative_to(out) else str(path)

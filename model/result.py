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
        doc = asdict(self) | {"artifact": str(self.artifact), "runs": str(self.runs)}
        tmp = Path(out) / f".{FILE}.tmp"
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, Path(out) / FILE)
        return Path(out) / FILE

    @classmethod
    def read(cls, out: Path) -> TrainResult:
        """The result in training output folder `out`; FileNotFoundError if training did
        not finish there."""
        doc = json.loads((Path(out) / FILE).read_text())
        return cls(Path(doc["artifact"]), Path(doc["runs"]), doc["metrics"], doc["config"])

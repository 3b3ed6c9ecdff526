"""The promotion gate: absolute floors, then no regression against the champion.

The primary metric is the squared error of the predicted reward on this run's
temporal holdout (lower is better). Challenger and champion are scored on the
same rows, and the mean per-row difference (challenger - champion) gets a paired
bootstrap confidence interval: the challenger is rejected only when the whole
interval lies above the allowed regression, so noise alone never moves
production, in either direction. The first model is judged on floors alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from model.metrics import paired_bootstrap_ci


@dataclass
class GateSpec:
    auc_min: float = 0.6  # ROC AUC of the score against reward > 0
    rmse_ratio_max: float = 0.95  # RMSE must beat predicting the training mean by 5%
    max_regression: float = 0.0  # allowed increase of the holdout MSE (challenger - champion)
    confidence: float = 0.95
    bootstrap: int = 2000


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]
    challenger: dict
    champion: dict | None = None
    champion_version: str | None = None
    mse_diff: dict | None = None  # mean, low, high of challenger - champion
    floors: dict = field(default_factory=dict)

    def summary(self) -> str:
        verdict = "pass" if self.passed else "reject"
        return f"{verdict}: " + "; ".join(self.reasons)

    def to_dict(self) -> dict:
        return asdict(self)


def decide(
    spec: GateSpec,
    challenger: dict,
    sq_err_new: np.ndarray,
    champion: dict | None = None,
    sq_err_old: np.ndarray | None = None,
    champion_version: str | None = None,
) -> GateDecision:
    """Judge a challenger's holdout metrics (and per-row squared errors) against the spec."""
    reasons, passed = [], True
    auc, rmse, base = challenger["auc"], challenger["rmse"], challenger["baseline_rmse"]
    floors = {
        "auc": auc,
        "auc_min": spec.auc_min,
        "rmse": rmse,
        "rmse_max": spec.rmse_ratio_max * base,
    }
    if not (isinstance(auc, float) and math.isfinite(auc)) or auc < spec.auc_min:
        passed = False
        reasons.append(f"AUC {auc:.3f} below the floor {spec.auc_min:.3f}")
    if rmse > spec.rmse_ratio_max * base:
        passed = False
        reasons.append(
            f"RMSE {rmse:.4f} above the floor {spec.rmse_ratio_max * base:.4f} "
            f"({spec.rmse_ratio_max:g} x the mean predictor's {base:.4f})"
        )
    if passed:
        reasons.append(f"floors met (AUC {auc:.3f}, RMSE {rmse:.4f})")
    diff = None
    if champion is None or sq_err_old is None:
        reasons.append("no champion: judged on floors alone")
    else:
        mean, lo, hi = paired_bootstrap_ci(
            sq_err_new, sq_err_old, spec.bootstrap, 1 - spec.confidence
        )
        diff = {"mean": mean, "low": lo, "high": hi}
        ci = f"{spec.confidence:.0%} CI [{lo:+.4f}, {hi:+.4f}]"
        if lo > spec.max_regression:
            passed = False
            reasons.append(
                f"regresses against v{champion_version}: holdout MSE {mean:+.4f} vs champion, {ci}"
            )
        else:
            word = "improves on" if hi < 0 else "does not regress against"
            reasons.append(f"{word} v{champion_version}: holdout MSE {mean:+.4f}, {ci}")
    return GateDecision(passed, reasons, challenger, champion, champion_version, diff, floors)

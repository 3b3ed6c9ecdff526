"""The promotion gate: absolute floors, then non-inferiority against the champion.

The primary metric is the squared error of the predicted reward on this run's
temporal holdout (lower is better). Challenger and champion are scored on the
same rows, and the mean per-row difference (challenger − champion) gets a paired
bootstrap confidence interval. The challenger is promoted only when the **upper**
bound of that interval lies below the margin (`margin` × the champion's holdout
MSE): an uncertain challenger never replaces the champion, and a retrain that is
as good up to the margin does. The first model is judged on floors alone.

Beside the error, the gate estimates the value of each model's decisions off-policy
(model/offpolicy.py: direct method, self-normalised IPS and doubly robust, with
bootstrap intervals and the effective sample size). When both doubly-robust
estimates are well conditioned (or `value_check` is set), the challenger must also
not lose value: the lower bound of the paired interval of (challenger − champion)
must lie above −`margin` × the holdout rewards' standard deviation. An interval
wider than the margin on either side cannot show that: a challenger exactly as good
as the champion would fail on the noise alone. Then (unless `value_check` is set)
the gate asks only that no loss beyond the margin is shown: the interval's upper
bound must lie above −margin.

The gate fails closed: a non-finite metric or per-row error, rows that do not
pair up, or a holdout too small to decide is a rejection with that reason.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from core.settings import GateSpec
from model.metrics import paired_bootstrap_ci


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]
    challenger: dict
    champion: dict | None = None
    champion_version: str | None = None
    mse_diff: dict | None = None  # mean, low, high of challenger − champion; margin
    floors: dict = field(default_factory=dict)
    rule: str = ""  # the rule in words, with the numbers
    # off-policy value: {"challenger": estimates, "champion": estimates or None,
    # "diff": {mean, low, high, margin} or None, "checked": bool,
    # "test": "non-inferiority" (lower bound above -margin) or "no shown loss" (upper
    # bound above -margin: the interval is too wide to show more), "note": str}
    value: dict | None = None
    # holdout rows the champion cannot rank, judged by the challenger alone: {"rows",
    # "bots": {bot: rows} the champion does not know, "new_actions": rows whose logged
    # action only the challenger knows, "unranked": rows of bots neither knows, "mse",
    # "value": the challenger's off-policy estimates on them}; None: every row compared
    apart: dict | None = None

    def summary(self) -> str:
        verdict = "pass" if self.passed else "reject"
        return f"{verdict}: " + "; ".join(self.reasons)

    def to_dict(self) -> dict:
        return asdict(self) | {"summary": self.summary()}


NON_INFERIORITY = "non-inferiority"  # the value criterion's tests (see the docstring)
NO_SHOWN_LOSS = "no shown loss"


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _unusable(spec: GateSpec, challenger: dict, new: np.ndarray, old: np.ndarray | None):
    """Why the numbers cannot support a decision, or None."""
    bad = [k for k in ("auc", "rmse", "baseline_rmse") if not _finite(challenger.get(k))]
    if bad:
        return "non-finite challenger metrics: " + ", ".join(
            f"{k}={challenger.get(k)}" for k in bad
        )
    for who, err in (("challenger", new), ("champion", old)):
        if err is not None and not np.all(np.isfinite(err)):
            return f"{int(np.sum(~np.isfinite(err)))} non-finite per-row errors of the {who}"
    if old is not None and len(old) != len(new):
        return f"per-row errors do not pair up ({len(new)} vs {len(old)} rows)"
    if len(new) < spec.min_holdout_rows:
        return (
            f"a holdout of {len(new)} rows is too small to decide "
            f"(at least {spec.min_holdout_rows})"
        )
    return None


def _floors(spec: GateSpec, challenger: dict) -> tuple[list[str], dict]:
    """Reasons the floors fail (empty when met), and the floor figures."""
    auc, rmse, base = challenger["auc"], challenger["rmse"], challenger["baseline_rmse"]
    floors = {"auc": auc, "auc_min": spec.auc_min, "rmse": rmse}
    floors["rmse_max"] = spec.rmse_ratio_max * base
    failed = []
    if auc < spec.auc_min:
        failed.append(f"AUC {auc:.3f} below the floor {spec.auc_min:.3f}")
    if rmse > floors["rmse_max"]:
        failed.append(
            f"RMSE {rmse:.4f} above the floor {floors['rmse_max']:.4f} "
            f"({spec.rmse_ratio_max:g} x the mean predictor's {base:.4f})"
        )
    return failed, floors


def rule_text(spec: GateSpec) -> str:
    lower = (
        "lower bound of the CI of (challenger − champion) doubly-robust value must also lie "
        f"above −{spec.margin:.0%} of the holdout rewards' standard deviation"
    )
    value = {
        None: (
            f" When both off-policy estimates are well conditioned, the {lower} (its upper "
            "bound, when the interval is wider than that on either side)."
        ),
        True: f" The {lower}.",
        False: " The off-policy value is reported, not applied.",
    }[spec.value_check]
    return (
        f"Promote when AUC ≥ {spec.auc_min:g}, RMSE ≤ {spec.rmse_ratio_max:g} × the mean "
        f"predictor's, and the upper bound of the {spec.confidence:.0%} CI of "
        f"(challenger − champion) holdout MSE is below {spec.margin:.0%} of the champion's "
        f"MSE; any non-finite number or a holdout under {spec.min_holdout_rows} rows rejects."
        + value
    )


def decide(
    spec: GateSpec,
    challenger: dict,
    sq_err_new: np.ndarray,
    champion: dict | None = None,
    sq_err_old: np.ndarray | None = None,
    champion_version: str | None = None,
    value: dict | None = None,
    apart: dict | None = None,
    alone: str = "no champion: judged on floors alone",
) -> GateDecision:
    """Judge a challenger's holdout metrics (and per-row squared errors) against the spec;
    `value` (from `value_evidence`) adds the off-policy criterion. The champion's errors
    pair with the challenger's on the rows both can rank; `apart` reports the others.
    Without a champion's errors the floors decide, for the reason `alone`."""
    new = np.asarray(sq_err_new, float)
    old = None if champion is None or sq_err_old is None else np.asarray(sq_err_old, float)
    out = GateDecision(
        False,
        [],
        challenger,
        champion,
        champion_version,
        rule=rule_text(spec),
        value=value,
        apart=apart,
    )
    if why := _unusable(spec, challenger, new, old):
        out.reasons.append(f"cannot decide: {why}")
        return out
    failed, out.floors = _floors(spec, challenger)
    if failed:
        out.reasons += failed + ([alone] if old is None else [])
        return out
    out.reasons.append(f"floors met (AUC {challenger['auc']:.3f}, RMSE {challenger['rmse']:.4f})")
    if apart:
        out.reasons.append(apart_text(apart))
    if old is None:
        out.passed = True
        out.reasons.append(alone)
        return out
    mean, lo, hi = paired_bootstrap_ci(new, old, spec.bootstrap, 1 - spec.confidence)
    champ_mse = float(old.mean())
    margin = spec.margin * champ_mse
    out.mse_diff = {"mean": mean, "low": lo, "high": hi, "margin": margin, "champion": champ_mse}
    ci = f"{spec.confidence:.0%} CI [{lo:+.4f}, {hi:+.4f}]"
    vs = f"v{champion_version}" if champion_version else "the champion"
    bound = f"margin {margin:+.4f} ({spec.margin:.0%} of {vs}'s MSE {champ_mse:.4f})"
    if hi < margin:
        out.passed = True
        out.reasons.append(
            f"non-inferior to {vs}: holdout MSE {mean:+.4f} vs champion, {ci}, "
            f"upper bound below the {bound}"
        )
    else:
        out.reasons.append(
            f"not shown non-inferior to {vs}: holdout MSE {mean:+.4f} vs champion, {ci}, "
            f"upper bound not below the {bound}"
        )
    if out.passed and value is not None and value.get("checked"):
        out.passed = _value_criterion(spec, value, vs, out.reasons)
    return out


def apart_text(apart: dict) -> str:
    """The rows judged apart, in a sentence."""
    parts = [f"{b} ({n})" for b, n in apart["bots"].items()]
    if apart["new_actions"]:
        parts.append(f"{apart['new_actions']} rows with actions new to it")
    text = f"{apart['rows']} holdout rows judged by the challenger alone"
    if parts:
        text += " (the champion does not know " + ", ".join(parts) + ")"
    if apart["rows"]:
        text += f": MSE {apart['mse']:.4f}"
        if (v := apart.get("value")) and all(_finite(x) for x in (v["dr"], *v["dr_ci"])):
            text += (
                f", doubly-robust value {v['dr']:+.4f} [{v['dr_ci'][0]:+.4f}, {v['dr_ci'][1]:+.4f}]"
            )
    if apart.get("unranked"):
        text += f"; {apart['unranked']} rows of bots neither model knows are left out"
    return text


def _value_criterion(spec: GateSpec, value: dict, vs: str, reasons: list[str]) -> bool:
    """The doubly-robust value must not drop by more than the margin: shown by the
    lower CI bound, or, when the interval is too wide for that, not contradicted by
    the upper one."""
    d = value.get("diff")
    if d is None or not all(_finite(d.get(k)) for k in ("mean", "low", "high", "margin")):
        reasons.append(f"cannot decide on value: {value.get('note') or 'no estimate'}")
        return False
    ci = f"{spec.confidence:.0%} CI [{d['low']:+.4f}, {d['high']:+.4f}]"
    text = f"doubly-robust value {d['mean']:+.4f} vs {vs}, {ci}"
    bound = -d["margin"]
    if value.get("test") == NO_SHOWN_LOSS:
        if d["high"] > bound:
            reasons.append(
                f"{text}: too wide to show non-inferiority; no loss beyond the margin "
                f"{bound:+.4f} shown"
            )
            return True
        reasons.append(f"loses value: {text}, upper bound below the margin {bound:+.4f}")
        return False
    if d["low"] > bound:
        reasons.append(f"{text}: lower bound above the margin {bound:+.4f}")
        return True
    reasons.append(f"loses value: {text}, lower bound not above the margin {bound:+.4f}")
    return False


def value_evidence(spec: GateSpec, new_rows, old_rows, reward: np.ndarray) -> dict:
    """Off-policy estimates for the gate from per-row pieces (model.offpolicy.PolicyRows)
    of the challenger and, when there is one, the champion."""
    from model.offpolicy import estimates

    alpha = 1 - spec.confidence
    kw = {"n_boot": spec.ope_bootstrap, "alpha": alpha, "min_ess": spec.ope_min_ess}
    out: dict = {"challenger": estimates(new_rows, **kw), "champion": None, "diff": None}
    warnings = []
    if not out["challenger"]["trusted"]:
        warnings.append(f"challenger: {out['challenger']['warning']}")
    if old_rows is not None:
        out["champion"] = estimates(old_rows, **kw)
        if not out["champion"]["trusted"]:
            warnings.append(f"champion: {out['champion']['warning']}")
        mean, lo, hi = paired_bootstrap_ci(new_rows.dr, old_rows.dr, spec.ope_bootstrap, alpha)
        margin = spec.margin * float(np.std(np.asarray(reward, float)))
        out["diff"] = {"mean": mean, "low": lo, "high": hi, "margin": margin}
    trusted = not warnings
    out["checked"] = old_rows is not None and (
        spec.value_check if spec.value_check is not None else trusted
    )
    out["note"] = (
        "; ".join(warnings) if warnings else "the off-policy estimates are well conditioned"
    )
    out["test"] = NON_INFERIORITY
    d = out["diff"]
    half = (d["high"] - d["low"]) / 2 if d else None
    if out["checked"] and spec.value_check is None and half > d["margin"]:
        # (a NaN half-width compares False: the criterion then stays strict and fails)
        out["test"] = NO_SHOWN_LOSS
        out["note"] += (
            f"; the paired interval is ±{half:.4f} wide, more than the "
            f"margin {d['margin']:.4f}: a challenger exactly as good would fail on noise, so "
            "only a loss beyond the margin that the interval shows rejects"
        )
    if old_rows is not None and not out["checked"]:
        out["note"] += (
            "; the value criterion was not applied"
            if spec.value_check is None
            else "; the value criterion is off (value_check=false)"
        )
    return out

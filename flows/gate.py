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

The evaluation that feeds the rule is here too: `judge_against_production` loads
the challenger and the current `Production` model and `compare_on_holdout` scores
both on the rows both can rank (a bot the champion never saw is judged by the
challenger alone and reported apart).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from core.registry import Registry, RegistryError
from core.settings import GateSpec
from model.metrics import bootstrap_ci, paired_bootstrap_ci
from model.result import TrainResult


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
    vs = f"v{champion_version}" if champion_version else "the champion"
    out.passed = _error_criterion(spec, new, old, vs, out)
    if out.passed and value is not None and value.get("checked"):
        out.passed = _value_criterion(spec, value, vs, out.reasons)
    return out


def _error_criterion(spec: GateSpec, new: np.ndarray, old: np.ndarray, vs: str, out) -> bool:
    """The upper bound of the paired interval of (challenger − champion) squared error
    must lie below the margin; records the interval and the reason on `out`."""
    mean, lo, hi = paired_bootstrap_ci(new, old, spec.bootstrap, 1 - spec.confidence)
    champ_mse = float(old.mean())
    margin = spec.margin * champ_mse
    out.mse_diff = {"mean": mean, "low": lo, "high": hi, "margin": margin, "champion": champ_mse}
    ci = f"{spec.confidence:.0%} CI [{lo:+.4f}, {hi:+.4f}]"
    bound = f"margin {margin:+.4f} ({spec.margin:.0%} of {vs}'s MSE {champ_mse:.4f})"
    shown = hi < margin
    out.reasons.append(
        f"{'non-inferior' if shown else 'not shown non-inferior'} to {vs}: holdout MSE "
        f"{mean:+.4f} vs champion, {ci}, upper bound {'' if shown else 'not '}below the {bound}"
    )
    return shown


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


# --- the evaluation: both models on this run's holdout ---------------------------


def judge_against_production(
    registry: Registry, result: TrainResult, snapshot: Path, spec: GateSpec, cache: Path
) -> GateDecision:
    """Score the challenger and the current champion on the same holdout; estimate
    the value of each one's decisions off-policy; apply the gate.

    A champion whose artifact cannot be loaded (corrupt, or without its files) serves
    nobody: the challenger is then judged on the floors alone, and the reason says so.
    """
    from model.artifact import ArtifactError, load
    from model.snapshot import read_rows, temporal_split

    cfg = result.train_config
    df = read_rows(Path(snapshot))
    train_df, _, holdout = temporal_split(df, cfg["val_fraction"], cfg["holdout_fraction"])
    challenger = load(result.artifact)
    old = registry.champion()
    if old is None:
        return compare_on_holdout(spec, challenger, None, train_df, holdout)
    try:
        champ = load(registry.download(old, cache))
    except (ArtifactError, RegistryError) as exc:
        alone = f"v{old.version} cannot be loaded ({exc}): judged on floors alone"
        return compare_on_holdout(spec, challenger, None, train_df, holdout, old.version, alone)
    return compare_on_holdout(spec, challenger, champ, train_df, holdout, old.version)


def compare_on_holdout(
    spec: GateSpec,
    challenger,
    champion,
    train_df,
    holdout,
    version=None,
    alone: str = "no champion: judged on floors alone",
) -> GateDecision:
    """The gate on loaded models: metrics, paired errors and off-policy values on
    `holdout`, with the behaviour policy estimated from `train_df`.

    The two models are compared on the rows both can rank. Rows of a bot the champion
    does not know, or whose logged action only the challenger knows, are judged by the
    challenger alone and reported apart; with fewer than `min_holdout_rows` rows in
    common the challenger is judged on the floors alone, as a first model is.
    """
    from model.evaluation import evaluate, per_row

    train_mean = float(train_df["reward"].mean())
    new_pr = per_row(challenger, holdout)
    propensity, sources = _propensities(train_df, holdout)
    reward = holdout["reward"].to_numpy(float)

    def evidence(new, old, r) -> dict:
        value = value_evidence(spec, new, old, r)
        value["propensities"] = sources
        if champion is not None:
            value["self_check"] = self_check(spec, champion, version, holdout)
        return value

    new_rows = _policy_rows(challenger, challenger, holdout, new_pr["pred"], propensity)
    new_metrics = evaluate(challenger, holdout, train_mean)
    if champion is None:
        value = evidence(new_rows, None, reward)
        return decide(spec, new_metrics, new_pr["sq_err"], None, None, version, value, alone=alone)
    both, apart = _rows_apart(spec, challenger, champion, holdout, new_pr["sq_err"], new_rows)
    if both.sum() < spec.min_holdout_rows:
        value = evidence(new_rows, None, reward)
        alone = (
            f"v{version} can rank only {int(both.sum())} of the {len(holdout)} holdout rows "
            f"(fewer than {spec.min_holdout_rows}): judged on floors alone"
        )
        return decide(spec, new_metrics, new_pr["sq_err"], None, None, version, value, apart, alone)
    common = holdout[both]
    # one reward model for both policies' direct and doubly-robust terms: the
    # challenger's, trained on the newest rows
    old_rows = _policy_rows(champion, challenger, common, new_pr["pred"][both], propensity[both])
    return decide(
        spec,
        new_metrics,
        new_pr["sq_err"][both],
        evaluate(champion, common, train_mean),
        per_row(champion, common)["sq_err"],
        version,
        evidence(new_rows.subset(both), old_rows, reward[both]),
        apart,
    )


def _propensities(train_df, holdout) -> tuple[np.ndarray, dict]:
    """Each holdout row's probability of its logged action: the one logged when a served
    decision was made, else the behaviour model's estimate (fitted on `train_df`);
    and how many rows had each."""
    from model.offpolicy import Behaviour

    behaviour = Behaviour(list(train_df["bot"]), list(train_df["input"]), list(train_df["action"]))
    estimated, _ = behaviour.propensity(
        list(holdout["bot"]), list(holdout["input"]), list(holdout["action"])
    )
    logged = holdout["propensity"].to_numpy(float)
    has = np.isfinite(logged)
    return np.where(has, logged, estimated), {
        "logged": int(has.sum()),
        "estimated": int((~has).sum()),
    }


def _rows_apart(spec: GateSpec, challenger, champion, holdout, sq_err, rows):
    """(mask of the rows both models can rank, report of the others or None).

    The champion cannot rank a row of a bot it does not know, nor judge a logged action
    that the challenger knows and it does not; the challenger cannot rank a bot that
    only the newest rows show (it is in neither model).
    """
    from model.offpolicy import estimates

    bots, actions = list(holdout["bot"]), list(holdout["action"])
    new_knows = np.array([challenger.knows(b) for b in bots], bool)
    old_knows = np.array(
        [
            champion.knows(b) and (champion.knows_action(b, a) or not challenger.knows_action(b, a))
            for b, a in zip(bots, actions, strict=True)
        ],
        bool,
    )
    both = new_knows & old_knows
    alone = new_knows & ~old_knows
    if both.all():
        return both, None
    new_bots = sorted({b for b, k in zip(bots, alone, strict=True) if k and not champion.knows(b)})
    report = {
        "rows": int(alone.sum()),
        "bots": {b: int(sum(x == b for x in np.asarray(bots)[alone])) for b in new_bots},
        "new_actions": int(sum(alone & np.array([champion.knows(b) for b in bots], bool))),
        "unranked": int((~new_knows).sum()),  # bots no model knows: judged by neither
        "mse": float(np.mean(sq_err[alone])) if alone.any() else None,
        "value": None,
    }
    if alone.any():
        report["value"] = estimates(
            rows.subset(alone),
            n_boot=spec.ope_bootstrap,
            alpha=1 - spec.confidence,
            min_ess=spec.ope_min_ess,
        )
    return both, report


def _policy_rows(policy, critic, holdout, q_logged, propensity):
    """Per-row off-policy pieces of `policy`'s choices, valued by `critic`; where the
    policy knows no action (a bot it has never seen) the logged decision stands."""
    from model.offpolicy import PolicyRows

    bots, inputs, types = list(holdout["bot"]), list(holdout["input"]), list(holdout["data_type"])
    logged = list(holdout["action"])
    chosen = policy.choose(bots, inputs, types)
    scored = [a if c is None else c for c, a in zip(chosen, logged, strict=True)]
    q_chosen = critic.score(list(zip(bots, types, inputs, scored, strict=True)))
    return PolicyRows.build(q_chosen, q_logged, chosen, logged, propensity, holdout["reward"])


def self_check(spec: GateSpec, champion, version: str | None, holdout) -> dict | None:
    """The IPS estimate of Production's own (exploring) policy on the decisions it
    served and logged, against their observed mean reward: recomputed from the model
    and the logged settings, the probabilities match the logged ones and the two agree
    within the interval. None when the holdout holds none of its decisions."""
    from model.config import Exploration
    from model.features import canonical_json

    records = [json.loads(d) if isinstance(d, str) else None for d in holdout["decision"]]
    own = [i for i, r in enumerate(records) if r and version and r.get("model_version") == version]
    if not own:
        return None
    rows, recs = holdout.iloc[own], [records[i] for i in own]
    ranked = champion.rank_many(
        [(b, x, r["candidates"]) for b, x, r in zip(rows["bot"], rows["input"], recs, strict=True)],
        list(rows["data_type"]),
    )
    pi = []
    for ranking, rec, action in zip(ranked, recs, rows["action"], strict=True):
        probs = Exploration(**rec["exploration"]).probabilities([c.lower for c in ranking])
        keys = [canonical_json(c.action) for c in ranking]
        chosen = canonical_json(action)
        pi.append(float(probs[keys.index(chosen)]) if chosen in keys else 0.0)
    w = np.asarray(pi) / rows["propensity"].to_numpy(float)
    r = rows["reward"].to_numpy(float)
    ips, lo, hi = bootstrap_ci(w * r, spec.ope_bootstrap, 1 - spec.confidence)
    out = {
        "rows": len(r),
        "ips": ips,
        "ci": [lo, hi],
        "observed": float(r.mean()),
        "max_weight_gap": float(np.max(np.abs(w - 1))),
    }
    out["agrees"] = bool(lo - 1e-9 <= out["observed"] <= hi + 1e-9)
    out["warning"] = (
        None
        if out["agrees"]
        else (
            f"the IPS estimate of v{version}'s value on its own {len(r)} logged decisions, "
            f"{out['ips']:+.4f} [{lo:+.4f}, {hi:+.4f}], does not contain their observed mean "
            f"reward {out['observed']:+.4f}: the logged probabilities are not what v{version} "
            "computes now (another model or other exploration settings served under its "
            "name), or rewards were joined to the wrong decisions"
        )
    )
    return out

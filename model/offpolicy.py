"""Off-policy estimates of a policy's value from logs that carry no propensities.

The logs record which action each bot took, not how likely it was to take it. The
behaviour policy is therefore estimated from the training rows: per bot, a
gradient-boosted classifier fitted to the log loss predicts the logged action
from the input's leaves. A row whose logged output carries a numeric
`propensity` field uses that instead.

On the holdout, for a target policy `pi` with chosen actions and a reward model `q`:

- direct method (DM): mean of q(x, pi(x));
- self-normalised IPS (SNIPS): sum(w r) / sum(w), w = 1[a = pi(x)] / p(a | x);
- doubly robust (DR): mean of q(x, pi(x)) + w (r - q(x, a)).

Each comes with a percentile bootstrap interval, and the weights with their
effective sample size (sum w)^2 / sum w^2. The estimate is called poorly
conditioned, in a plain sentence, when the effective sample size is small or the
behaviour is close to deterministic where the policy departs from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.features import canonical_json, leaves

PROPENSITY_FLOOR = 0.01  # estimated propensities are clipped here (weights <= 100)
MAX_STRING = 64  # longer strings (free text) are left out of the behaviour features


def _features(x) -> dict:
    out: dict = {}
    for path, v in leaves(x, "in"):
        if isinstance(v, bool):
            out[f"{path}={v}"] = 1.0
        elif isinstance(v, int | float):
            if np.isfinite(v) and abs(v) < 1e12:
                out[path] = float(v)
        elif isinstance(v, str) and len(v) <= MAX_STRING:
            out[f"{path}={v}"] = 1.0
    return out


def action_key(action) -> str:
    """An action's identity: its canonical JSON without a logged `propensity`."""
    if isinstance(action, dict) and "propensity" in action:
        action = {k: v for k, v in action.items() if k != "propensity"}
    return canonical_json(action)


def logged_propensity(action) -> float | None:
    p = action.get("propensity") if isinstance(action, dict) else None
    if isinstance(p, int | float) and not isinstance(p, bool) and 0 < p <= 1:
        return float(p)
    return None


class Behaviour:
    """The estimated behaviour policy: P(logged action | bot, input)."""

    def __init__(self, train_bots, train_inputs, train_actions, seed: int = 0):
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.feature_extraction import DictVectorizer

        self.models: dict[str, tuple] = {}
        keys = np.array([action_key(a) for a in train_actions], object)
        bots = np.asarray(train_bots, object)
        for bot in sorted(set(bots)):
            rows = np.flatnonzero(bots == bot)
            y = keys[rows]
            classes, counts = np.unique(y, return_counts=True)
            if len(classes) == 1:  # one action only: it is certain
                self.models[bot] = (None, None, classes, np.ones(1))
                continue
            vec = DictVectorizer(sparse=False)
            X = vec.fit_transform([_features(train_inputs[i]) for i in rows])
            # shallow, slow and with large leaves: propensities, not a sharp classifier
            # fitted to the log loss, a proper scoring rule: its probabilities stay
            # calibrated (a sigmoid recalibration on top changed nothing measurable and
            # took 4x as long)
            model = HistGradientBoostingClassifier(
                max_iter=100,
                max_depth=2,
                learning_rate=0.05,
                min_samples_leaf=max(20, min(100, len(rows) // 20)),
                random_state=seed,
            ).fit(X, y)
            self.models[bot] = (vec, model, model.classes_, counts / counts.sum())

    def propensity(self, bots, inputs, actions) -> tuple[np.ndarray, int]:
        """P(action | bot, input) per row, clipped below at PROPENSITY_FLOOR, and how
        many rows were clipped (an action or bot the training rows never showed). A
        propensity logged in the action itself is taken as it is."""
        out = np.full(len(bots), PROPENSITY_FLOOR)
        keys = np.array([action_key(a) for a in actions], object)
        bots_arr = np.asarray(bots, object)
        for bot in set(bots_arr):
            rows = np.flatnonzero(bots_arr == bot)
            if bot not in self.models:
                continue
            vec, model, classes, prior = self.models[bot]
            index = {c: i for i, c in enumerate(classes)}
            if model is None:
                probs = np.tile(prior, (len(rows), 1))
            else:
                probs = model.predict_proba(vec.transform([_features(inputs[i]) for i in rows]))
            for j, i in enumerate(rows):
                k = index.get(keys[i])
                if k is not None:
                    out[i] = probs[j, k]
        clipped = int(np.sum(out < PROPENSITY_FLOOR))
        out = np.maximum(out, PROPENSITY_FLOOR)
        for i, a in enumerate(actions):
            if (p := logged_propensity(a)) is not None:
                out[i] = p
        return out, clipped


@dataclass
class PolicyRows:
    """Per-row pieces of the estimates for one target policy on the holdout."""

    dm: np.ndarray  # q(x, pi(x))
    weight: np.ndarray  # 1[a = pi(x)] / p(a | x)
    dr: np.ndarray  # q(x, pi(x)) + w (r - q(x, a))
    reward: np.ndarray

    @classmethod
    def build(cls, q_chosen, q_logged, chosen, logged, propensity, reward, kept=None) -> PolicyRows:
        """`chosen[i]` None: the policy cannot rank row i (a bot it does not know); the
        bot's own logged decision stands there, valued at the reward it earned."""
        kept = np.array([c is None for c in chosen]) if kept is None else np.asarray(kept)
        match = np.array(
            [
                k or action_key(c) == action_key(a)
                for c, a, k in zip(chosen, logged, kept, strict=True)
            ]
        )
        w = match / np.asarray(propensity, float)
        w[kept] = 1.0  # the logging policy itself: its own reward, unweighted
        q_chosen, q_logged = np.asarray(q_chosen, float), np.asarray(q_logged, float)
        q_chosen = np.where(kept, q_logged, q_chosen)
        r = np.asarray(reward, float)
        return cls(q_chosen, w, q_chosen + w * (r - q_logged), r)

    def subset(self, rows: np.ndarray) -> PolicyRows:
        """The pieces of the rows selected by a boolean mask (or an index array)."""
        return PolicyRows(self.dm[rows], self.weight[rows], self.dr[rows], self.reward[rows])


def _snips(w: np.ndarray, r: np.ndarray) -> float:
    total = w.sum()
    return float((w * r).sum() / total) if total > 0 else float("nan")


def estimates(
    rows: PolicyRows, n_boot: int = 500, alpha: float = 0.05, seed: int = 0, min_ess: float = 100
) -> dict:
    """DM, SNIPS and DR values with bootstrap intervals; the weights' ESS; and a
    sentence when the estimate should not be trusted (`trusted` False)."""
    n = len(rows.dr)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    w, r = rows.weight, rows.reward
    boot_snips = np.array([_snips(w[i], r[i]) for i in idx])
    q = [alpha / 2, 1 - alpha / 2]

    def ci(samples) -> list[float]:
        samples = samples[np.isfinite(samples)]
        return [float(v) for v in np.quantile(samples, q)] if len(samples) else [np.nan] * 2

    ess = float(w.sum() ** 2 / (w * w).sum()) if (w * w).sum() > 0 else 0.0
    out = {
        "dm": float(rows.dm.mean()),
        "dm_ci": ci(rows.dm[idx].mean(axis=1)),
        "snips": _snips(w, r),
        "snips_ci": ci(boot_snips),
        "dr": float(rows.dr.mean()),
        "dr_ci": ci(rows.dr[idx].mean(axis=1)),
        "ess": ess,
        "matched": int(np.sum(w > 0)),
        "rows": n,
    }
    out["warning"] = conditioning(out, min_ess)
    out["trusted"] = out["warning"] is None
    return out


def conditioning(est: dict, min_ess: float) -> str | None:
    """The plain reason an estimate is poorly conditioned, or None."""
    if est["matched"] == 0:
        return (
            "the policy never chooses the logged action on the holdout: the logs say "
            "nothing about its value"
        )
    if est["ess"] < min_ess:
        return (
            f"only {est['ess']:.0f} rows' worth of evidence (effective sample size, "
            f"under {min_ess:.0f}): the behaviour rarely took the actions this policy "
            "takes, so the estimate is too noisy to trust"
        )
    return None


def _snips_diff_ci(w, r, n_boot: int, alpha: float, seed: int) -> list[float]:
    """Percentile bootstrap interval of SNIPS(w, r) minus the mean reward (a ratio: each
    resample recomputes both)."""
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        i = rng.integers(0, len(r), len(r))
        boot.append(_snips(w[i], r[i]) - float(r[i].mean()))
    boot = np.asarray(boot)
    boot = boot[np.isfinite(boot)]
    if not len(boot):
        return [float("nan")] * 2
    return [float(v) for v in np.quantile(boot, [alpha / 2, 1 - alpha / 2])]


def live_estimates(
    reward,
    logged_probability,
    target_probability,
    q_logged,
    dm_target,
    dm_logging,
    n_boot: int = 500,
    alpha: float = 0.05,
    seed: int = 0,
    min_ess: float = 100,
) -> dict:
    """A target policy's value minus the logging policy's, on decisions the logging
    policy served with known probabilities (the shadow's evidence).

    Per decision: its reward r, the probability mu the served action was chosen with,
    the probability pi the target gives it, a reward model's value of it (q_logged), and
    the reward model's expectation under each policy (dm_target = sum_a pi(a) q(a),
    dm_logging = sum_a mu(a) q(a)). With w = pi / mu, the logging policy's IPS and DR
    values are r and dm_logging + (r - q_logged) (its own weights are 1); the target's
    are w r, sum(w r) / sum(w) (SNIPS) and dm_target + w (r - q_logged). Each difference
    (target - logging) comes with a paired percentile bootstrap interval; the weights
    with their effective sample size. Unbiased for any reward model, since mu is the
    probability actually used."""
    from model.metrics import bootstrap_ci

    r = np.asarray(reward, float)
    w = np.asarray(target_probability, float) / np.asarray(logged_probability, float)
    q = np.asarray(q_logged, float)
    dr_target = np.asarray(dm_target, float) + w * (r - q)
    dr_logging = np.asarray(dm_logging, float) + (r - q)
    out: dict = {"rows": len(r)}
    if len(r) == 0:
        out["warning"] = "no scored decision has a reward yet"
        return out
    kw = {"n_boot": n_boot, "alpha": alpha, "seed": seed}
    for name, target, logging in (("ips", w * r, r), ("dr", dr_target, dr_logging)):
        mean, lo, hi = bootstrap_ci(target - logging, **kw)
        out[name] = {
            "challenger": float(target.mean()),
            "production": float(logging.mean()),
            "diff": mean,
            "ci": [lo, hi],
        }
    snips = _snips(w, r)
    out["snips"] = {
        "challenger": snips,
        "production": float(r.mean()),
        "diff": snips - float(r.mean()),
        "ci": _snips_diff_ci(w, r, **kw),
    }
    out["ess"] = float(w.sum() ** 2 / (w * w).sum()) if (w * w).sum() > 0 else 0.0
    out["reward_std"] = float(r.std())
    out["warning"] = (
        f"only {out['ess']:.0f} decisions' worth of evidence (effective sample size, under "
        f"{min_ess:.0f}): the Challenger rarely chooses what Production served"
        if out["ess"] < min_ess
        else None
    )
    return out

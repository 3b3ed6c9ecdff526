"""Evaluate a model on the temporal holdout: prediction quality and policy value."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd

from model import metrics
from model.artifact import AgentModel
from model.features import canonical_json


def per_row(model: AgentModel, holdout: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per-row quantities the gate pairs across models: prediction and squared error."""
    rows = list(
        zip(holdout["bot"], holdout["data_type"], holdout["input"], holdout["action"], strict=True)
    )
    pred = model.score(rows)
    reward = holdout["reward"].to_numpy(float)
    return {"pred": pred, "sq_err": (pred - reward) ** 2}


def evaluate(
    model: AgentModel, holdout: pd.DataFrame, train_mean: float | None = None, world=None
) -> dict:
    """Metrics of `model` on `holdout` (rows with parsed input/action, oldest first).

    With `world` (the synthetic generator's ground truth), also the true mean reward
    of the learned policy, the behaviour policy, a per-bot most-frequent-action
    baseline and the oracle, and the share of the behaviour→oracle gap closed.
    A row of a bot the model does not know keeps the logged action (the bot's own
    decision) in every policy value.
    """
    reward = holdout["reward"].to_numpy(float)
    pr = per_row(model, holdout)
    chosen = model.choose(list(holdout["bot"]), list(holdout["input"]), list(holdout["data_type"]))
    replay, matches = metrics.replay_value(
        [canonical_json(a) for a in chosen],
        [canonical_json(a) for a in holdout["action"]],
        reward,
    )
    base = float(np.mean(reward)) if train_mean is None else train_mean
    out = {
        "rows": len(holdout),
        "rmse": metrics.rmse(pr["pred"], reward),
        "mae": metrics.mae(pr["pred"], reward),
        "auc": metrics.roc_auc(pr["pred"], reward > 0),
        "baseline_rmse": metrics.rmse(np.full_like(reward, base), reward),
        "replay_value": replay,
        "replay_matches": matches,
        "logged_value": float(np.mean(reward)),
    }
    if world is not None:
        out |= true_values(model, holdout, chosen, world)
    return out


def true_values(model: AgentModel, holdout: pd.DataFrame, chosen: list[dict | None], world) -> dict:
    whens = [
        t.to_pydatetime().replace(tzinfo=None) if isinstance(t, pd.Timestamp) else t
        for t in holdout["created_at"]
    ]
    bots, inputs = list(holdout["bot"]), list(holdout["input"])

    def value(actions) -> float:
        return float(
            np.mean(
                [
                    world.true_reward(b, x, a, w)
                    for b, x, a, w in zip(bots, inputs, actions, whens, strict=True)
                ]
            )
        )

    logged = list(holdout["action"])
    policy = value([c if c is not None else a for c, a in zip(chosen, logged, strict=True)])
    behaviour = value(logged)
    frequent = value(
        [model.bank[b][0] if model.knows(b) else a for b, a in zip(bots, logged, strict=True)]
    )
    oracle = value(
        [world.oracle_action(b, x, w) for b, x, w in zip(bots, inputs, whens, strict=True)]
    )
    gap = oracle - behaviour
    return {
        "true_value_policy": policy,
        "true_value_behaviour": behaviour,
        "true_value_most_frequent": frequent,
        "true_value_oracle": oracle,
        "gap_closed": (policy - behaviour) / gap if gap > 0 else float("nan"),
    }


def synthetic_world(drift_at: str | None, hard: bool = False):
    """The generator's ground truth (rewards do not depend on its seed)."""
    from model.synthetic import World

    return World(drift_at=datetime.fromisoformat(drift_at) if drift_at else None, hard=hard)

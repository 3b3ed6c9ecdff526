"""The gate when the bots change: a bot the champion never saw is judged by the
challenger alone, never a crash."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from core.settings import GateSpec
from flows.gate import compare_on_holdout as compare
from model.artifact import load
from model.result import TrainResult
from model.snapshot import read_rows, temporal_split
from model.synthetic import World, write_snapshot
from tests.helpers import ROOT, model_train_command

pytestmark = pytest.mark.slow

OLD_BOTS = ("trading_advanced", "financial_stocks", "analytics_portfolio")
# what is compared, not how well these short trainings do: the floors let any model by
SPEC = GateSpec(auc_min=0.0, rmse_ratio_max=10.0)
NEW_BOT = "platform_onboarding"


def _trained(snap, out):
    cmd = model_train_command(snap, out, 0, "--max-epochs", "2", "--threads", "1")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return load(out / "artifact"), TrainResult.read(out).train_config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("new-bots")
    old_snap = write_snapshot(root / "old", 1000, World(seed=1, only=OLD_BOTS))
    new_snap = write_snapshot(root / "new", 2000, World(seed=2))
    champion, _ = _trained(old_snap, root / "champion")
    challenger, cfg = _trained(new_snap, root / "challenger")
    train_df, _, holdout = temporal_split(
        read_rows(new_snap), cfg["val_fraction"], cfg["holdout_fraction"]
    )
    return champion, challenger, train_df, holdout


def test_the_champion_chooses_nothing_for_a_bot_it_does_not_know(models):
    champion, challenger, _, holdout = models
    x = holdout.loc[holdout["bot"] == NEW_BOT, "input"].iloc[0]
    assert champion.choose([NEW_BOT, OLD_BOTS[0]], [x, x])[0] is None
    assert challenger.choose([NEW_BOT], [x])[0] is not None
    assert champion.rank_many([(NEW_BOT, x, None)]) == [[]]


def test_a_new_bot_is_judged_by_the_challenger_alone_and_the_rest_compared(models):
    champion, challenger, train_df, holdout = models
    d = compare(SPEC, challenger, champion, train_df, holdout, "1")
    new_rows = int((holdout["bot"] == NEW_BOT).sum())
    assert 0 < new_rows < len(holdout)
    assert d.apart["rows"] == new_rows and d.apart["bots"] == {NEW_BOT: new_rows}
    assert d.apart["unranked"] == 0 and np.isfinite(d.apart["mse"])
    assert np.isfinite(d.apart["value"]["dr"])
    # both models' metrics, errors and values are on the rows both can rank
    assert d.champion["rows"] == len(holdout) - new_rows
    assert d.challenger["rows"] == len(holdout)
    assert np.isfinite(d.mse_diff["mean"]) and d.value["diff"] is not None
    assert d.value["champion"]["rows"] == d.value["challenger"]["rows"] == d.champion["rows"]
    text = d.summary()
    assert f"{new_rows} holdout rows judged by the challenger alone" in text
    assert f"the champion does not know {NEW_BOT} ({new_rows})" in text
    assert "v1: holdout MSE" in text  # the comparison itself was made


def test_a_champion_that_can_rank_too_few_rows_leaves_the_floors_to_decide(models):
    champion, challenger, train_df, holdout = models
    # the champion knows one bot of the four: about a quarter of a 400-row holdout
    only_one = type(champion)(
        champion.net, champion.featurizer, {OLD_BOTS[0]: champion.bank[OLD_BOTS[0]]}
    )
    d = compare(SPEC, challenger, only_one, train_df, holdout, "1")
    known = int((holdout["bot"] == OLD_BOTS[0]).sum())
    assert known < GateSpec().min_holdout_rows
    assert d.mse_diff is None and d.apart["rows"] == len(holdout) - known
    assert f"v1 can rank only {known} of the {len(holdout)} holdout rows" in d.summary()
    assert "judged on floors alone" in d.summary()
    assert d.passed  # the floors alone decide, and they let it by

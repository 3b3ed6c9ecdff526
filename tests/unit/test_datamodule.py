"""The data module: levels found on the rewards trained on, recency as loss weights."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest
import torch

from model.config import TrainConfig
from model.features import canonical_json
from model.module import RewardRegressor, SnapshotDataModule, rows_of
from model.network import ModelConfig, RewardEnsemble, build, to_tensors
from model.synthetic import World, write_snapshot

END = datetime(2026, 6, 1)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_snapshot(tmp_path_factory.mktemp("snap"), 3000, World(seed=3), end=END)


def _data(snapshot, **cfg) -> SnapshotDataModule:
    data = SnapshotDataModule(snapshot, TrainConfig(**cfg))
    data.setup("fit")
    return data


def test_newer_rows_weigh_more_in_the_loss_and_the_weights_average_one(snapshot):
    data = _data(snapshot, half_life_days=2.0)
    w = data.train_set.tensors[-1].numpy()
    age = (data.train_df["created_at"].max() - data.train_df["created_at"]).dt.total_seconds()
    assert w.mean() == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(w) >= -1e-6)  # rows are oldest first: weights never fall
    two_days = np.argmin(np.abs(age.to_numpy() - 2 * 86400))  # half the newest row's weight
    assert w[two_days] == pytest.approx(w[-1] / 2, rel=0.01)
    # every row is in each epoch: the loader shuffles, it does not draw by weight
    seen = torch.cat([b[0][:, 0] for b in data.train_dataloader()])
    assert len(seen) == len(data.train_set)


def test_with_no_half_life_every_row_weighs_one_and_validation_always_does(snapshot):
    data = _data(snapshot, half_life_days=0.0)
    assert torch.all(data.train_set.tensors[-1] == 1.0)
    assert torch.all(_data(snapshot).val_set.tensors[-1] == 1.0)


def test_the_loss_is_the_weighted_mean_squared_error(snapshot):
    data = _data(snapshot)
    fz = data.featurizer
    model_cfg = ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset)
    module = RewardRegressor(model_cfg.to_dict(), TrainConfig().to_dict())
    module.log = lambda *a, **k: None  # no Trainer here
    *x, reward, _ = (t[:4] for t in data.train_set.tensors)
    with torch.no_grad():
        err = (module(*x) - reward) ** 2
        only_first = module._common_step((*x, reward, torch.tensor([4.0, 0, 0, 0])), "train")
    assert float(only_first) == pytest.approx(float(err[0]), rel=1e-5)


def test_levels_are_found_on_the_rewards_trained_on(snapshot):
    """The synthetic world's levels (an RSI of 30 and 70, a P/E of 40, a Sharpe ratio of
    1.2) are found from 2,160 rows; with the rewards shuffled (a deliberately broken
    model) no level is."""
    cuts = _data(snapshot).featurizer.cuts
    assert any(abs(c - 30) < 0.5 for c in cuts["in.indicators.rsi"])
    assert any(abs(c - 70) < 0.5 for c in cuts["in.indicators.rsi"])
    assert any(abs(c - 40) < 0.5 for c in cuts["in.fundamentals.pe_ratio"])
    assert any(abs(c - 1.2) < 0.02 for c in cuts["in.portfolio.sharpe"])
    assert "in.price" not in cuts and "in.indicators.macd" not in cuts
    shuffled = _data(snapshot, shuffle_rewards=True).featurizer.cuts
    assert shuffled == {}


def test_members_each_learn_on_their_own_loss_and_validation_reports_their_mean(snapshot):
    data = _data(snapshot)
    fz = data.featurizer
    cfg = ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset, members=2)
    module = RewardRegressor(cfg.to_dict(), TrainConfig(members=2).to_dict())
    logged = {}
    module.log = lambda name, value, **k: logged.update({name: float(value)})
    *x, reward, weight = (t[:64] for t in data.train_set.tensors)
    with torch.no_grad():
        each = module.net.each(*x)
    mse = [float((weight * (e - reward) ** 2).mean()) for e in each]
    loss = module._common_step((*x, reward, weight), "train")
    assert float(loss) == pytest.approx(sum(mse) / 2, rel=1e-5)
    loss.backward()  # both members get a gradient from their own error
    assert all(m.head[-1].weight.grad.abs().sum() > 0 for m in module.net.members)
    with torch.no_grad():
        module._common_step((*x, reward, weight), "val")
    mean = float((weight * (each.mean(0) - reward) ** 2).mean())
    assert logged["val_loss"] == pytest.approx(mean, rel=1e-5)


def test_an_ensemble_artifact_loads_and_reproduces_its_canaries(snapshot, tmp_path):
    from model import artifact

    data = _data(snapshot)
    fz = data.featurizer
    cfg = ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset, members=2)
    net = build(cfg)
    canary = artifact.canary_rows(data.val_df)
    bank = artifact.action_bank(data.train_df)
    dt = artifact.default_data_types(data.train_df)
    model = artifact.AgentModel(net, fz, bank, dt)
    path = artifact.save(tmp_path / "a", model, {"model": cfg.to_dict()}, canary, {})
    model = artifact.load(path)  # verifies the canaries
    assert isinstance(model.net, RewardEnsemble) and len(model.net.members) == 2
    rows = [(c["bot"], c["data_type"], c["input"], c["action"]) for c in canary]
    with torch.no_grad():
        want = net.eval()(*to_tensors(fz.encode(rows))).numpy()
    np.testing.assert_allclose(model.score(rows), want, atol=1e-6)


def test_distillation_fits_the_teachers_scores_on_the_logged_and_other_bank_actions(snapshot):
    from model.artifact import action_bank

    data = _data(snapshot, distill=3, distill_actions=2)
    n = len(data.train_set)
    fz = data.featurizer
    cfg = ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset, members=3)
    torch.manual_seed(0)
    teacher = build(cfg).eval()
    bank = action_bank(data.train_df)
    weights = data.train_set.tensors[-1].clone()
    data.distill(teacher, bank, 2)
    *x, target, w = data.train_set.tensors
    assert len(target) == 3 * n  # every bot's bank holds more than two other actions
    with torch.no_grad():
        assert torch.allclose(target[:64], teacher(*[t[:64] for t in x]), atol=1e-5)
        assert torch.allclose(target[-64:], teacher(*[t[-64:] for t in x]), atol=1e-5)
    # each other action weighs as its row; the logged pairs keep their weights
    assert torch.equal(w[:n], weights) and torch.equal(w[n : n + 2], weights[:1].repeat(2))
    # the other actions are drawn from the bot's bank, never the one logged
    bot, data_type, doc, logged = next(rows_of(data.train_df))
    ids = {
        canonical_json(a): to_tensors(fz.encode([(bot, data_type, doc, a)]))[0][0]
        for a in bank[bot]
    }
    drawn = [k for k, t in ids.items() if any(torch.equal(t, x[0][n + j]) for j in range(2))]
    assert len(drawn) == 2 and canonical_json(logged) not in drawn


def test_with_trees_the_target_mixes_their_scores_with_the_networks_at_their_share(snapshot):
    from model.artifact import action_bank

    data = _data(snapshot, distill=3, distill_actions=1)
    n = len(data.train_set)
    trees = data.tree_teacher(threads=1)
    fz = data.featurizer
    cfg = ModelConfig.preset("small", fz.vocab_size, fz.max_len, fz.word_offset, members=3)
    torch.manual_seed(0)
    teacher = build(cfg).eval()
    bank = action_bank(data.train_df)
    data.distill(teacher, bank, 1, trees, 0.25)
    *x, target, _ = data.train_set.tensors
    assert len(target) == 2 * n
    logged = list(rows_of(data.train_df))
    with torch.no_grad():
        nets = teacher(*[t[:64] for t in x])
    by_trees = torch.as_tensor(trees.predict(logged[:64]))
    assert not torch.allclose(nets, by_trees, atol=1e-2)
    assert torch.allclose(target[:64], 0.75 * nets + 0.25 * by_trees, atol=1e-5)


def test_the_trees_learn_the_training_and_validation_rows(snapshot):
    data = _data(snapshot)
    trees = data.tree_teacher(threads=1)
    assert trees.rows == len(data.train_df) + len(data.val_df)
    val = list(rows_of(data.val_df))
    fitted = np.corrcoef(trees.predict(val), data.val_df["reward"])[0, 1]
    without = np.corrcoef(_trees_of_training_rows(data).predict(val), data.val_df["reward"])
    assert fitted > without[0, 1]  # the validation rows were learned, not only seen


def _trees_of_training_rows(data):
    from model.trees import TreeTeacher

    *_, reward, weights = data.train_set.tensors
    rows = list(rows_of(data.train_df))
    return TreeTeacher.fit(rows, reward.numpy(), weights.numpy(), seed=0, threads=1)


def test_the_trees_learn_the_rewards_trained_on_shuffled_when_they_are(snapshot):
    true = _data(snapshot).train_df["reward"].to_numpy()
    data = _data(snapshot, shuffle_rewards=True)
    shuffled = data.train_set.tensors[-2].numpy()
    trees = data.tree_teacher(threads=1)
    assert trees.rows == len(data.train_df)  # no true rewards of the validation rows
    pred = trees.predict(list(rows_of(data.train_df)))
    assert np.corrcoef(pred, shuffled)[0, 1] > np.corrcoef(pred, true)[0, 1] + 0.2

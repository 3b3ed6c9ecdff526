"""`python -m model.train` options become the TrainConfig the training uses."""

from __future__ import annotations

from model import config
from model.config import TrainConfig
from model.train import parse_args


def train_config(args) -> TrainConfig:
    return config.parse(args)[1]


BASE = ["--snapshot", "snap", "--out", "out"]


def test_options_not_given_keep_the_defaults():
    assert train_config(parse_args(BASE)) == TrainConfig()


def test_zero_is_a_value_not_a_missing_option():
    cfg = train_config(parse_args([*BASE, "--half-life-days", "0", "--patience", "0"]))
    assert cfg.half_life_days == 0.0 and cfg.patience == 0
    assert TrainConfig().half_life_days > 0 and TrainConfig().patience > 0


def test_flags_and_values_are_taken():
    cfg = train_config(parse_args([*BASE, "--shuffle-rewards", "--lr", "0.01", "--seed", "7"]))
    assert cfg.shuffle_rewards and cfg.lr == 0.01 and cfg.seed == 7


def test_an_unknown_schedule_is_refused_with_the_choices(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        parse_args([*BASE, "--schedule", "linear"])
    assert exit_.value.code == 2 and "cosine" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cosine, constant"):
        TrainConfig(schedule="linear")


def test_training_length_is_counted_in_steps_on_a_small_snapshot_unless_given():
    from model.config import EPOCHS, MIN_STEPS

    cfg = TrainConfig()
    assert cfg.max_epochs is None
    assert cfg.epochs(72_000) == EPOCHS  # 563 steps an epoch: the default length
    assert cfg.epochs(720) * 6 >= MIN_STEPS  # 6 steps an epoch: stretched to MIN_STEPS
    assert cfg.epochs(720, world_size=2) * 3 >= MIN_STEPS  # each rank takes half
    given = train_config(parse_args([*BASE, "--max-epochs", "2"]))
    assert given.max_epochs == 2 and given.epochs(720) == 2  # given: taken as it is


def test_the_warmup_is_one_setting_from_the_environment_to_the_schedule(monkeypatch):
    """Declared once (model.config): VALIFI_TRAIN_WARMUP reaches the training command, the
    command's option reaches the recipe, and the recipe the learning-rate schedule."""
    from core.settings import Settings
    from flows.training import train_options
    from model.module import RewardRegressor, warmup_cosine

    monkeypatch.setenv("VALIFI_TRAIN_WARMUP", "0.25")
    options = train_options(Settings(_env_file=None).train)
    assert options[options.index("--warmup") + 1] == "0.25"
    recipe = train_config(parse_args([*BASE, *options]))
    assert recipe.warmup == 0.25 and TrainConfig().warmup == 0.1
    module = RewardRegressor({"vocab_size": 16}, recipe.to_dict())
    assert module.warmup == 0.25
    assert warmup_cosine(24, 100, module.warmup) == 1.0 > warmup_cosine(23, 100, module.warmup)


def test_a_small_snapshot_takes_more_of_the_trees_more_actions_and_less_pessimism():
    from model.config import LARGE_ROWS, SMALL_ROWS

    cfg = train_config(parse_args(BASE))
    # unset: by size
    assert cfg.distill_trees is None and cfg.distill_actions is None and cfg.pessimism is None
    small, large = cfg.sized(SMALL_ROWS), cfg.sized(LARGE_ROWS)
    assert (small.distill_trees, small.distill_actions, small.pessimism) == (0.75, 3, 1.0)
    assert (large.distill_trees, large.distill_actions, large.pessimism) == (0.25, 1, 2.0)
    assert cfg.sized(100) == small and cfg.sized(100 * LARGE_ROWS) == large
    between = [cfg.sized(n) for n in range(SMALL_ROWS, LARGE_ROWS + 1, 250)]
    shares = [c.distill_trees for c in between]
    assert shares == sorted(shares, reverse=True) and len(set(shares)) > 10
    pessimisms = [c.pessimism for c in between]
    assert pessimisms == sorted(pessimisms) and len(set(pessimisms)) > 10
    assert {c.distill_actions for c in between} == {3, 2, 1}
    # given, a setting is taken as it is at any size
    given = train_config(
        parse_args([*BASE, "--distill-trees", "0", "--distill-actions", "2", "--pessimism", "0"])
    )
    assert given.sized(SMALL_ROWS).distill_trees == 0 and given.sized(50).distill_actions == 2
    assert given.sized(LARGE_ROWS).distill_actions == 2
    assert given.sized(SMALL_ROWS).pessimism == 0 == given.sized(LARGE_ROWS).pessimism

"""How a training runs, and how the served policy explores, each setting declared once.

`TrainConfig` is the recipe (saved with the model), `LaunchConfig` how the process
runs it, `Exploration` how the agent server draws its decisions (`VALIFI_SERVE_*`).
Every field is declared here once, with its default, its help and its limits;
everything else is derived from these declarations:

- `python -m model.train` takes each field as an option (`add_options`, `parse`);
- the flow's settings take each as `VALIFI_TRAIN_<FIELD>` (core.settings.TrainSpec
  is built from these fields);
- the flow launches training with the options of the fields its settings change
  (`options`).

Adding a setting is adding a field here (and its test).
"""

from __future__ import annotations

import argparse
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

EPOCHS = 15  # training length unless max_epochs is given ...
MIN_STEPS = 300  # ... stretched on a small snapshot to this many optimizer steps
PRESETS = ("small", "large")
SCHEDULES = ("cosine", "constant")
# distillation's (tree share, other actions per row) and the ranking's pessimism by
# default, on a snapshot of up to SMALL_ROWS training rows and from LARGE_ROWS
# (bench/policy_bench.py, hard world: at 1k rows three quarters from the trees, more
# actions per row and one standard error kept every one of ten seeds within 0.02 of
# LightGBM's gap closed; at 10k rows the quarter, one and two did best, at 100k the
# quarter and one)
SMALL_ROWS, LARGE_ROWS = 1_000, 5_000
SMALL_DISTILL, LARGE_DISTILL = (0.75, 3), (0.25, 1)
SMALL_PESSIMISM, LARGE_PESSIMISM = 1.0, 2.0


def setting(
    default,
    help: str,
    choices: tuple | None = None,
    ge: float | None = None,
    le: float | None = None,
):
    """A field with its help text and limits (`choices`, or bounds `ge` and `le`)."""
    return field(default=default, metadata={"help": help, "choices": choices, "ge": ge, "le": le})


class Checked:
    """Dataclasses whose fields' limits are checked on construction."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                raise ValueError(f"{f.name} must be one of {', '.join(meta['choices'])}: {value!r}")
            ge = meta.get("ge")
            if ge is not None and value is not None and not (math.isfinite(value) and value >= ge):
                raise ValueError(f"{f.name} must be a number >= {ge:g}: {value}")
            le = meta.get("le")
            if le is not None and value is not None and not value <= le:
                raise ValueError(f"{f.name} must be a number <= {le:g}: {value}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig(Checked):
    """The training recipe; saved with every model (config.json)."""

    preset: str = setting("small", "network size: small (CPU) or large (GPU)", PRESETS)
    max_len: int = setting(64, "tokens per (input, action) pair at most", ge=8)
    batch_size: int = setting(128, "rows per optimizer step (per rank)", ge=1)
    lr: float = setting(4e-3, "peak learning rate (AdamW)", ge=0)
    gradient_clip: float = setting(1.0, "largest gradient norm (0: unclipped)", ge=0)
    weight_decay: float = setting(0.1, "AdamW's decoupled weight decay", ge=0)
    max_epochs: int | None = setting(
        None,
        f"epochs; unset: {EPOCHS}, or more on a small snapshot so that it trains for "
        f"{MIN_STEPS} steps (the schedule and the weight average count steps)",
        ge=1,
    )
    patience: int = setting(10, "epochs without a better validation loss before stopping", ge=0)
    val_fraction: float = setting(0.1, "newest rows of the training part, to validate", ge=0)
    holdout_fraction: float = setting(0.2, "newest rows overall, for evaluation only", ge=0)
    seed: int = setting(0, "random seed of the weights and the shuffles")
    shuffle_rewards: bool = setting(False, "deliberately break the model (gate tests)")
    half_life_days: float = setting(
        3.0,
        "newer rows weigh more in the loss: a row this many days older than the newest "
        "weighs half (0: every row alike); after a drift the model follows sooner",
        ge=0,
    )
    schedule: str = setting(
        "cosine",
        "learning rate: cosine (up over the warm-up, then down to 0) or constant",
        SCHEDULES,
    )
    warmup: float = setting(0.1, "share of the steps the cosine schedule warms up over", ge=0)
    ema_decay: float = setting(
        0.99, "the weights kept are a moving average of this decay (0: the last)", ge=0
    )
    members: int = setting(
        1,
        "networks trained side by side, the score their mean: steadier decisions on "
        "noisy rewards, at this many times the training and scoring time",
        ge=1,
    )
    distill: int = setting(
        3,
        "train this many networks side by side first, then fit the one served to their "
        "mean score instead of to the noisy rewards, on the logged pairs and on "
        "`distill_actions` other actions per row: decisions nearly as good as the "
        "ensemble's at the serving cost of one network, for about 3.5 times the training "
        "time (0 or 1: off; with `members` above 1 the ensemble itself is served)",
        ge=0,
    )
    distill_actions: int | None = setting(
        None,
        "other bank actions per training row given the teacher's score (distillation); "
        f"unset: {SMALL_DISTILL[1]} on a snapshot of up to {SMALL_ROWS:,} training rows, "
        f"{LARGE_DISTILL[1]} from {LARGE_ROWS:,}, in between by the rows' logarithm",
        ge=0,
    )
    distill_trees: float | None = setting(
        None,
        "share of the teacher's score that comes from gradient-boosted trees fitted to the "
        "same rows (scikit-learn), the rest from the networks: trees find thresholds and "
        "flags from few rows and err differently, so the mix decides better than either "
        "(0: networks only; with distillation only); unset: "
        f"{SMALL_DISTILL[0]} on a snapshot of up to {SMALL_ROWS:,} training rows, where "
        f"the networks have least to learn from, {LARGE_DISTILL[0]} from {LARGE_ROWS:,} "
        "(at 0.5 there the served network's steps at a level grow less sharp), in "
        "between by the rows' logarithm",
        ge=0,
        le=1,
    )
    interaction: str = setting(
        "prefix",
        "how the network meets the context and the action: prefix (the context's tokens "
        "do not attend to the action's, so a request's context is encoded once for all "
        "its candidates) or joint (every token attends to every other)",
        ("prefix", "joint"),
    )
    pessimism: float | None = setting(
        None,
        "actions rank by their expected reward less this many standard errors of a mean "
        "over the rows that show them, so that a handful of lucky rewards does not win "
        f"(0: by the expected reward alone); unset: {SMALL_PESSIMISM:g} on a snapshot of up "
        f"to {SMALL_ROWS:,} training rows, where the trees' share of the teacher is "
        f"largest, {LARGE_PESSIMISM:g} from {LARGE_ROWS:,}, in between by the rows' logarithm",
        ge=0,
    )

    def sized(self, train_rows: int) -> TrainConfig:
        """This recipe with the settings left unset that depend on the snapshot's size
        (`distill_trees`, `distill_actions`, `pessimism`) set for `train_rows` training
        rows: the recipe saved with the model says what was used."""
        span = math.log(LARGE_ROWS / SMALL_ROWS)
        at = min(1.0, max(0.0, math.log(max(1, train_rows) / SMALL_ROWS) / span))
        by_size = {
            "distill_trees": round(_between(SMALL_DISTILL[0], LARGE_DISTILL[0], at), 3),
            "distill_actions": round(_between(SMALL_DISTILL[1], LARGE_DISTILL[1], at)),
            "pessimism": round(_between(SMALL_PESSIMISM, LARGE_PESSIMISM, at), 3),
        }
        return replace(self, **{k: v for k, v in by_size.items() if getattr(self, k) is None})

    def epochs(self, train_rows: int, world_size: int = 1) -> int:
        """How many epochs to train `train_rows` rows for, split over `world_size` ranks."""
        if self.max_epochs is not None:
            return self.max_epochs
        steps = math.ceil(train_rows / (self.batch_size * max(1, world_size)))
        return max(EPOCHS, math.ceil(MIN_STEPS / max(1, steps)))


def _between(small: float, large: float, at: float) -> float:
    """The value `at` (0 to 1) of the way from `small` to `large`."""
    return small + at * (large - small)


@dataclass
class LaunchConfig(Checked):
    """How one training process runs (not saved with the model)."""

    accelerator: str = setting("auto", "auto, cpu or gpu", ("auto", "cpu", "gpu"))
    devices: int = setting(1, "processes (devices) per node", ge=1)
    num_nodes: int = setting(1, "nodes (machines) training one model", ge=1)
    strategy: str = setting("auto", "Lightning's strategy; auto: ddp when more than one rank")
    precision: str | None = setting(None, "unset: bf16-mixed on GPU, 32-true on CPU")
    threads: int | None = setting(None, "torch threads per process; unset: the cores shared", ge=1)
    progress: bool = setting(True, "show a progress bar")
    ground_truth: str = setting(
        "none",
        "also report true policy values from the synthetic generator (or its hard world): "
        "only for data made by seed-data",
        ("none", "synthetic", "synthetic-hard"),
    )
    drift_at: str | None = setting(None, "the synthetic generator's drift time (ISO)")


@dataclass
class Exploration(Checked):
    """How the served policy explores; every field is also `VALIFI_SERVE_<FIELD>`."""

    exploration: str = setting(
        "epsilon",
        "epsilon: the best candidate with probability 1 - epsilon, else one at random; "
        "softmax: each in proportion to exp(lower bound / temperature)",
        ("epsilon", "softmax"),
    )
    # 0.05: over a simulated week (bench/closed_loop.py) it ranked as well as 0.1 and
    # 0.2 on both worlds and paid half the cost of 0.1 in what it served
    epsilon: float = setting(0.05, "the share of decisions drawn at random (epsilon)", ge=0)
    temperature: float = setting(0.05, "the softmax's temperature, in reward units", ge=1e-6)
    min_probability: float = setting(
        0.01, "every candidate's least probability (capped at 1 / candidates)", ge=0
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("epsilon", "min_probability"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name} must be at most 1: {getattr(self, name)}")

    def probabilities(self, lowers):
        """The probability of each candidate, best first (`lowers`: their lower bounds,
        in ranked order); they sum to 1."""
        import numpy as np

        lowers = np.asarray(lowers, float)
        k = len(lowers)
        if k == 0:
            return np.zeros(0)
        if self.exploration == "softmax":
            z = np.exp((lowers - lowers.max()) / self.temperature)
            p = z / z.sum()
        else:
            p = np.full(k, self.epsilon / k)
            p[0] += 1.0 - self.epsilon
        floor = min(self.min_probability, 1.0 / k)
        if p.min() < floor:
            p = (1.0 - k * floor) * p + floor
        return p / p.sum()


CONFIGS = (LaunchConfig, TrainConfig)


def _kind(cls, name: str) -> type:
    """The plain type of a field (int for `int | None`)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def annotations(cls) -> dict[str, object]:
    """Each field's type, resolved (for models built from these fields)."""
    return typing.get_type_hints(cls)


def add_options(parser: argparse.ArgumentParser) -> None:
    """One option per field of both configs; an option not given is None."""
    for cls in CONFIGS:
        for f in fields(cls):
            flag, kind = "--" + f.name.replace("_", "-"), _kind(cls, f.name)
            help = f.metadata["help"]
            if kind is bool:
                action = argparse.BooleanOptionalAction if f.default else "store_true"
                parser.add_argument(flag, action=action, default=None, help=help)
            else:
                choices = f.metadata["choices"]
                parser.add_argument(flag, type=kind, default=None, choices=choices, help=help)


def parse(namespace: argparse.Namespace) -> tuple[LaunchConfig, TrainConfig]:
    """The configs of the options given (the others keep their defaults)."""
    given = {k: v for k, v in vars(namespace).items() if v is not None}
    launch, recipe = (
        cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given}) for cls in CONFIGS
    )
    return launch, recipe


def options(values: typing.Mapping[str, object]) -> list[str]:
    """The options of `python -m model.train` that set these fields, for each field
    whose value differs from its default."""
    out: list[str] = []
    for cls in CONFIGS:
        for f in fields(cls):
            if f.name not in values or f.default is MISSING:
                continue
            value = values[f.name]
            if value == f.default:
                continue
            flag = f.name.replace("_", "-")
            if isinstance(value, bool):
                out.append(f"--{flag}" if value else f"--no-{flag}")
            elif value is not None:
                out += [f"--{flag}", str(value)]
    return out

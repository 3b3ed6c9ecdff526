"""Lightning pieces: the data module over a Parquet snapshot and the LightningModule."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from model.features import Encoded, Featurizer
from model.network import ModelConfig, build

SCHEDULES = ("cosine", "constant")
EPOCHS = 15  # training length unless max_epochs is given ...
MIN_STEPS = 300  # ... stretched on a small snapshot to this many optimizer steps


@dataclass
class TrainConfig:
    preset: str = "small"  # network size: small (CPU) or large (GPU)
    max_len: int = 64
    batch_size: int = 128
    lr: float = 4e-3
    gradient_clip: float = 1.0  # largest gradient norm (0: unclipped)
    weight_decay: float = 0.1  # AdamW's, decoupled
    # None: EPOCHS, or more on a small snapshot, so that it trains for MIN_STEPS steps
    # (the schedule and the weight average count steps, not epochs)
    max_epochs: int | None = None
    patience: int = 10  # epochs without a better validation loss before stopping
    val_fraction: float = 0.1  # newest rows of the training part, for checkpoints
    holdout_fraction: float = 0.2  # newest rows overall, for evaluation only
    seed: int = 0
    shuffle_rewards: bool = False  # deliberately break the model (gate tests)
    # Newer rows weigh more in the loss: a row this many days older than the newest
    # training row weighs half as much (0: every row alike). After the reward rule
    # drifts, the model follows the new rule sooner; every row is still seen each epoch.
    half_life_days: float = 3.0
    # learning rate: cosine (up over the first tenth of max_epochs, then down to 0) or
    # constant; the decay settles the weights, where a noisy validation loss would not
    schedule: str = "cosine"
    ema_decay: float = 0.99  # weights validated and kept: a moving average (0: the last)
    # networks trained side by side, the score their mean: steadier decisions on noisy
    # rewards, at this many times the training and scoring time
    members: int = 1
    # Actions are ranked by a lower bound: the expected reward less this many standard
    # errors of a mean over the rows the action was logged in (the validation error
    # over the square root of their count), so that an action the logs show a handful
    # of times is not picked on a few lucky rewards (0: by the expected reward alone)
    pessimism: float = 2.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.pessimism) and self.pessimism >= 0):
            raise ValueError(f"pessimism must be a number >= 0: {self.pessimism}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}: {self.schedule!r}")
        if self.members < 1:
            raise ValueError(f"members must be at least 1: {self.members}")

    def to_dict(self) -> dict:
        return asdict(self)

    def epochs(self, train_rows: int, world_size: int = 1) -> int:
        """How many epochs to train `train_rows` rows for, split over `world_size` ranks."""
        if self.max_epochs is not None:
            return self.max_epochs
        steps = math.ceil(train_rows / (self.batch_size * max(1, world_size)))
        return max(EPOCHS, math.ceil(MIN_STEPS / max(1, steps)))


def read_snapshot(snapshot: Path) -> pd.DataFrame:
    """Trainable rows of a snapshot, oldest first: scored, with parseable payloads."""
    df = pd.read_parquet(Path(snapshot) / "data.parquet")
    ok = df["reward"].notna() & df["input_ok"].fillna(False) & df["action_ok"].fillna(False)
    df = df[ok].sort_values(["created_at", "id"], kind="mergesort").reset_index(drop=True)
    df["input"] = [json.loads(s) for s in df["input"]]
    df["action"] = [json.loads(s) for s in df["action"]]
    return df


def temporal_split(df: pd.DataFrame, val_fraction: float, holdout_fraction: float):
    """(train, val, holdout) of rows sorted oldest first: the newest rows are the holdout,
    the newest of the rest validate. Never a random split."""
    n = len(df)
    n_hold = round(n * holdout_fraction)
    n_val = round((n - n_hold) * val_fraction)
    cut_val, cut_hold = n - n_hold - n_val, n - n_hold
    return df.iloc[:cut_val], df.iloc[cut_val:cut_hold], df.iloc[cut_hold:]


def rows_of(df: pd.DataFrame):
    return zip(df["bot"], df["data_type"], df["input"], df["action"], strict=True)


def to_tensors(enc: Encoded, reward: np.ndarray | None = None) -> list[torch.Tensor]:
    out = [
        torch.from_numpy(enc.ids),
        torch.from_numpy(enc.nums),
        torch.from_numpy(enc.is_num),
        torch.from_numpy(enc.segment),
        torch.from_numpy(enc.quant),
        torch.from_numpy(enc.place),
        torch.from_numpy(enc.leaf),
        torch.from_numpy(enc.cut),
    ]
    if reward is not None:
        out.append(torch.as_tensor(reward, dtype=torch.float32))
    return out


class SnapshotDataModule(L.LightningDataModule):
    """Reads the snapshot (never queries a database), splits it by time, encodes it."""

    def __init__(self, snapshot: Path, cfg: TrainConfig):
        super().__init__()
        self.snapshot = Path(snapshot)
        self.cfg = cfg
        self.featurizer: Featurizer | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.featurizer is not None:
            return
        df = read_snapshot(self.snapshot)
        self.train_df, self.val_df, self.holdout_df = temporal_split(
            df, self.cfg.val_fraction, self.cfg.holdout_fraction
        )
        if min(len(self.train_df), len(self.val_df)) == 0:
            raise ValueError(f"too few trainable rows in {self.snapshot}: {len(df)}")
        reward = self.train_df["reward"].to_numpy(np.float32)
        if self.cfg.shuffle_rewards:
            reward = np.random.default_rng(self.cfg.seed).permutation(reward)
        # the levels where rewards step are found on the rewards trained on
        self.featurizer = Featurizer.build(
            rows_of(self.train_df), max_len=self.cfg.max_len, rewards=reward
        )
        self.train_set = TensorDataset(
            *to_tensors(self.featurizer.encode(rows_of(self.train_df)), reward),
            torch.as_tensor(self.recency_weights(), dtype=torch.float32),
        )
        val_reward = self.val_df["reward"].to_numpy(np.float32)
        self.val_set = TensorDataset(
            *to_tensors(self.featurizer.encode(rows_of(self.val_df)), val_reward),
            torch.ones(len(val_reward)),  # validation weighs every row alike
        )

    def recency_weights(self) -> np.ndarray:
        """Loss weight of each training row, newer rows heavier, averaging 1 (so the
        loss keeps its scale); all 1 when `half_life_days` is 0."""
        if self.cfg.half_life_days <= 0:
            return np.ones(len(self.train_df))
        t = self.train_df["created_at"]
        age_days = (t.max() - t).dt.total_seconds().to_numpy() / 86400.0
        w = np.exp2(-age_days / self.cfg.half_life_days)
        return w / w.mean()

    def train_dataloader(self) -> DataLoader:
        # weighted in the loss rather than drawn by weight: every row is seen once an
        # epoch (drawing with replacement left a third out, and cost the stationary
        # case more than it gave); under DDP Lightning shards the shuffle between ranks
        return DataLoader(self.train_set, batch_size=self.cfg.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)


def warmup_cosine(step: int, total: int, warmup: float = 0.1) -> float:
    """Learning-rate factor at `step` of `total`: up linearly over the first `warmup`
    share of the steps, then down to 0 along a cosine (any total, one step included)."""
    up = max(1, round(warmup * total))
    if step < up:
        return (step + 1) / up
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - up) / max(1, total - up))))


def ema(decay: float):
    """Exponential moving average of the weights whose decay grows to `decay` over the
    first steps, so that a short training is not pulled back to its first weights."""

    def average(avg: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = torch.clamp((1 + n) / (10 + n), max=decay).to(avg.dtype)
        return d * avg + (1 - d) * current

    return average


class RewardRegressor(L.LightningModule):
    """Fits the expected reward of (input, action) with mean squared error."""

    def __init__(self, model_config: dict, train_config: dict):
        super().__init__()
        self.save_hyperparameters()
        self.net = build(ModelConfig(**model_config))
        self.lr = train_config["lr"]
        self.weight_decay = train_config["weight_decay"]
        self.schedule = train_config.get("schedule", "constant")

    def forward(self, *x):
        return self.net(*x)

    def _common_step(self, batch, stage: str) -> torch.Tensor:
        *x, reward, weight = batch
        each = self.net.each(*x).float()  # (M, B): every member's estimate
        # weighted mean squared error, each member on its own (the mean of their errors)
        loss = (weight * (each - reward) ** 2).mean()
        # what is reported is the error of the score, the members' mean
        shown = loss if stage == "train" else (weight * (each.mean(0) - reward) ** 2).mean()
        self.log(
            f"{stage}_loss",
            shown,
            prog_bar=True,
            sync_dist=stage != "train",
            batch_size=len(reward),
        )
        return loss

    def training_step(self, batch, batch_idx):
        return self._common_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, "val")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.schedule == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, total=total))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt

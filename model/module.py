"""Lightning pieces: the data module over a Parquet snapshot and the LightningModule."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

from model.config import TrainConfig
from model.features import Featurizer
from model.network import ModelConfig, build, to_tensors
from model.snapshot import read_rows, temporal_split
from model.trees import TreeTeacher


def rows_of(df: pd.DataFrame):
    return zip(df["bot"], df["data_type"], df["input"], df["action"], strict=True)


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
        df = read_rows(self.snapshot)
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

    def distill(
        self,
        teacher,
        bank: dict[str, list[dict]],
        actions: int,
        trees: TreeTeacher | None = None,
        tree_share: float = 0.0,
    ) -> None:
        """Train on the teachers' scores instead of the rewards: on the logged pairs, and
        on `actions` other actions of each row's bot from `bank` (drawn with the seed,
        weighted as their row). The target is `teacher`'s score, mixed with `trees`'
        at `tree_share`. The rewards' noise is gone from the targets, and the actions a
        context was not logged with get targets too."""
        rng = np.random.default_rng(self.cfg.seed)
        *xs, _, weights = self.train_set.tensors
        pairs = list(rows_of(self.train_df))
        extra, extra_weights = [], []
        for i, (bot, data_type, doc, action) in enumerate(pairs):
            others = [a for a in bank.get(bot, []) if a != action]
            if not others:
                continue
            for k in rng.choice(len(others), size=min(actions, len(others)), replace=False):
                extra.append((bot, data_type, doc, others[k]))
                extra_weights.append(weights[i])
        if extra:
            more = to_tensors(self.featurizer.encode(extra))
            xs = [torch.cat([a, b]) for a, b in zip(xs, more, strict=True)]
            weights = torch.cat([weights, torch.stack(extra_weights)])
        teacher.eval()
        with torch.no_grad():
            target = torch.cat(
                [
                    teacher(*(x[i : i + 1024] for x in xs)).float()
                    for i in range(0, len(xs[0]), 1024)
                ]
            )
        if trees is not None and tree_share > 0:
            by_trees = torch.as_tensor(trees.predict(pairs + extra))
            target = (1 - tree_share) * target + tree_share * by_trees
        self.train_set = TensorDataset(*xs, target, weights)

    def tree_teacher(self, threads: int) -> TreeTeacher:
        """Gradient-boosted trees fitted to the rewards trained on, each row weighed as
        in the network's loss, and to the validation rows (the newest, weighed as the
        newest training row): trees have no use for them to stop by, and on a small
        snapshot the newest rows are worth most. With the rewards shuffled (a model
        broken on purpose) the trees see the shuffled training rewards alone."""
        *_, reward, weights = self.train_set.tensors
        rows, reward, weights = list(rows_of(self.train_df)), reward.numpy(), weights.numpy()
        if not self.cfg.shuffle_rewards:
            rows += list(rows_of(self.val_df))
            reward = np.concatenate([reward, self.val_set.tensors[-2].numpy()])
            weights = np.concatenate([weights, np.full(len(self.val_df), weights[-1])])
        return TreeTeacher.fit(rows, reward, weights, seed=self.cfg.seed, threads=threads)

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
        self.net = build(ModelConfig.from_dict(model_config))
        self.lr = train_config["lr"]
        self.weight_decay = train_config["weight_decay"]
        self.schedule = train_config.get("schedule", "constant")
        self.warmup = train_config.get("warmup", 0.1)  # (checkpoints made before it: 0.1)

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
            schedule = partial(warmup_cosine, total=total, warmup=self.warmup)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt

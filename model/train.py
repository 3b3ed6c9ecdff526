"""Train a reward model on a snapshot and write the artifact.

    python -m model.train --snapshot SNAP --out OUT [--devices N --num-nodes N ...]

Works as a plain process, with Lightning's own DDP launcher (`--devices 2`), and
under `torchrun` or any launcher that sets MASTER_ADDR, MASTER_PORT, NODE_RANK and
WORLD_SIZE (one process per "node" with `--num-nodes 2 --devices 1`).

    OUT/artifact/        the model (see model.artifact)
    OUT/runs/            TensorBoard logs
    OUT/checkpoints/     Lightning's checkpoint of the last epoch (it becomes the artifact)
    OUT/teacher/         with distillation (`--distill N`, the default): the N networks
                         trained first, whose mean score the served network learns
    OUT/ranks/R.json     canary scores computed by each global rank
    OUT/result.json      metrics and paths, written by rank 0 when everything is done
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    EarlyStopping,
    ModelCheckpoint,
    TQDMProgressBar,
    WeightAveraging,
)
from lightning.pytorch.loggers import TensorBoardLogger

from model import artifact, config, snapshot
from model.config import LaunchConfig, TrainConfig
from model.evaluation import evaluate, synthetic_world
from model.module import RewardRegressor, SnapshotDataModule, ema
from model.network import ModelConfig
from model.result import TrainResult
from model.snapshot import Manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m model.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--snapshot", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    config.add_options(p)  # every field of LaunchConfig and TrainConfig
    return p.parse_args(argv)


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def build_trainer(
    out: Path, launch: LaunchConfig, cfg: TrainConfig, train_rows: int
) -> tuple[L.Trainer, ModelCheckpoint]:
    gpu = _on_gpu(launch.accelerator)
    world = launch.devices * launch.num_nodes
    strategy = launch.strategy
    if strategy == "auto" and world > 1:
        strategy = "ddp"
    # The weights the schedule ends on (averaged) become the artifact, not those of the
    # epoch with the lowest validation loss: past the first epochs that loss rises a
    # little as the network sharpens its levels while its decisions keep improving, and
    # on noisy rewards its minimum is a matter of chance (an epoch-4 pick closed 0.68
    # of the hard world's gap where the last epoch closed 0.75). Validation still stops
    # a long training early (patience) and is reported.
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints",
        monitor=None,
        save_top_k=1,
        filename="epoch-{epoch}-{val_loss:.4f}",
    )
    callbacks = [checkpoint, EarlyStopping(monitor="val_loss", mode="min", patience=cfg.patience)]
    if cfg.ema_decay > 0:
        callbacks.append(WeightAveraging(avg_fn=ema(cfg.ema_decay)))
    if launch.progress:
        callbacks.append(TQDMProgressBar(refresh_rate=20))
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=launch.devices,
        num_nodes=launch.num_nodes,
        strategy=strategy,
        precision=launch.precision or ("bf16-mixed" if gpu else "32-true"),
        max_epochs=cfg.epochs(train_rows, world),
        callbacks=callbacks,
        logger=TensorBoardLogger(out / "runs", name="train"),
        deterministic=True,
        enable_progress_bar=launch.progress,
        enable_model_summary=False,
        log_every_n_steps=10,
        gradient_clip_val=cfg.gradient_clip or None,
    )
    return trainer, checkpoint


def _threads(launch: LaunchConfig) -> int:
    if launch.threads:
        return launch.threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", launch.devices))
    return max(1, (os.cpu_count() or 1) // max(1, local))


def run(snap: Path, out: Path, launch: LaunchConfig, cfg: TrainConfig) -> TrainResult | None:
    """Train on `snap` into `out`; rank 0 returns the result, the other ranks None."""
    torch.set_num_threads(_threads(launch))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = SnapshotDataModule(snap, cfg)
    data.setup("fit")
    cfg = cfg.sized(len(data.train_df))  # the by-size defaults, saved as used
    fz = data.featurizer
    model_cfg = ModelConfig.preset(
        cfg.preset,
        fz.vocab_size,
        fz.max_len,
        fz.word_offset,
        members=cfg.members,
        interaction=cfg.interaction,
    )
    started = time.perf_counter()
    if cfg.distill > 1 and cfg.members == 1:
        _distill(data, out, launch, cfg, model_cfg)
    module = RewardRegressor(model_cfg.to_dict(), cfg.to_dict())
    trainer, checkpoint = build_trainer(out, launch, cfg, len(data.train_df))
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started

    kept = RewardRegressor.load_from_checkpoint(
        checkpoint.best_model_path, map_location="cpu", weights_only=False
    )
    net = kept.net.float().cpu().eval()
    canary = artifact.canary_rows(data.holdout_df if len(data.holdout_df) else data.val_df)
    _write_rank_canaries(out, trainer, artifact.AgentModel(net, fz).score(artifact.pairs(canary)))
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    bank = artifact.action_bank(data.train_df)
    support = _support(data, bank, cfg, trainer)
    probe = artifact.AgentModel(
        net,
        fz,
        bank,
        artifact.default_data_types(data.train_df),
        support=artifact.Support.from_json(support, bank),
    )
    world = (
        synthetic_world(launch.drift_at, hard=launch.ground_truth == "synthetic-hard")
        if launch.ground_truth != "none"
        else None
    )
    metrics = _metrics(probe, data, world) | _figures(data, trainer, seconds)
    config_doc = {
        "model": model_cfg.to_dict(),
        "train": cfg.to_dict(),
        "snapshot": _lineage(snap),
        "trainer": _trainer(trainer, launch),
    }
    path = artifact.save(out / "artifact", probe, config_doc, canary, metrics, support)
    result = TrainResult(path, out / "runs", metrics, config_doc)
    result.write(out)
    return result


def _distill(
    data: SnapshotDataModule, out: Path, launch: LaunchConfig, cfg: TrainConfig, model_cfg
) -> None:
    """Train `cfg.distill` networks side by side (the teacher), then make their mean
    score the served network's targets (`SnapshotDataModule.distill`): on noisy rewards
    the teacher's scores are steadier than the rewards, and one network serves them at
    the cost of one. With `cfg.distill_trees` above 0, gradient-boosted trees are part
    of the teacher at that share (`model.trees`)."""
    teacher = RewardRegressor(replace(model_cfg, members=cfg.distill).to_dict(), cfg.to_dict())
    trainer, _ = build_trainer(out / "teacher", launch, cfg, len(data.train_df))
    trainer.fit(teacher, datamodule=data)  # ends on the weights kept (averaged)
    trees = data.tree_teacher(_threads(launch)) if cfg.distill_trees > 0 else None
    bank = artifact.action_bank(data.train_df)
    data.distill(teacher.net.float().cpu(), bank, cfg.distill_actions, trees, cfg.distill_trees)
    # the served network starts from the weights it would have had trained alone
    L.seed_everything(cfg.seed, workers=True, verbose=False)


def _write_rank_canaries(out: Path, trainer: L.Trainer, scores) -> None:
    """Each rank's canary scores (the ranks must agree: one model, not several)."""
    rank = trainer.global_rank
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    (out / "ranks" / f"{rank}.json").write_text(
        json.dumps(
            {"rank": rank, "world_size": trainer.world_size, "canary_scores": scores.tolist()}
        )
    )


def _support(data: SnapshotDataModule, bank: dict, cfg: TrainConfig, trainer: L.Trainer) -> dict:
    """What the ranking's lower bound needs (see artifact.Support): how many rows show
    each bank action, the pessimism, and the noise of one reward (the validation error)."""
    return {
        "counts": artifact.bank_counts(data.train_df, bank),
        "pessimism": cfg.pessimism,
        "noise_sd": float(trainer.callback_metrics["val_loss"]) ** 0.5,  # of the weights kept
    }


def _metrics(probe: artifact.AgentModel, data: SnapshotDataModule, world) -> dict:
    """The holdout evaluation (empty without a holdout)."""
    if not len(data.holdout_df):
        return {}
    return evaluate(probe, data.holdout_df, float(data.train_df["reward"].mean()), world)


def _figures(data: SnapshotDataModule, trainer: L.Trainer, seconds: float) -> dict:
    samples = len(data.train_df) * trainer.current_epoch
    return {
        "train_rows": len(data.train_df),
        "val_rows": len(data.val_df),
        "epochs": trainer.current_epoch,
        "train_seconds": seconds,
        "samples_per_s": samples / seconds if seconds else 0.0,
        "val_loss": float(trainer.callback_metrics["val_loss"]),
        # numbers in the training rows that were NaN, infinite or beyond float range
        "missing_numbers": data.featurizer.missing_numbers,
    }


def _lineage(snap: Path) -> dict:
    m = Manifest.read(snap)
    return {"path": str(snap), "sha256": m.sha256, "rows": m.rows, "window": m.window}


def _trainer(trainer: L.Trainer, launch: LaunchConfig) -> dict:
    return {
        "world_size": trainer.world_size,
        "num_nodes": launch.num_nodes,
        "devices": launch.devices,
        "precision": str(trainer.precision),
        "accelerator": type(trainer.accelerator).__name__,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not snapshot.exists(args.snapshot):
        print(f"no snapshot at {args.snapshot} ({snapshot.DATA} missing)", file=sys.stderr)
        return 2
    try:
        launch, cfg = config.parse(args)
    except ValueError as exc:
        print(f"python -m model.train: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.snapshot, args.out, launch, cfg)
    if result is not None:
        m = result.metrics
        keys = [
            "rmse",
            "auc",
            "true_value_policy",
            "true_value_behaviour",
            "true_value_most_frequent",
            "true_value_oracle",
            "gap_closed",
            "samples_per_s",
        ]
        print(json.dumps({k: m[k] for k in keys if k in m}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

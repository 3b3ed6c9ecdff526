"""Train a reward model on a snapshot and write the artifact.

    python -m model.train --snapshot SNAP --out OUT [--devices N --num-nodes N ...]

Works as a plain process, with Lightning's own DDP launcher (`--devices 2`), and
under `torchrun` or any launcher that sets MASTER_ADDR, MASTER_PORT, NODE_RANK and
WORLD_SIZE (one process per "node" with `--num-nodes 2 --devices 1`).

    OUT/artifact/        the model (see model.artifact)
    OUT/runs/            TensorBoard logs
    OUT/checkpoints/     Lightning's checkpoint of the last epoch (it becomes the artifact)
    OUT/ranks/R.json     canary scores computed by each global rank
    OUT/result.json      metrics and paths, written by rank 0 when everything is done
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields
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

from model import artifact
from model.evaluation import evaluate, synthetic_world
from model.module import SCHEDULES, RewardRegressor, SnapshotDataModule, TrainConfig, ema
from model.network import ModelConfig
from model.result import TrainResult


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m model.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--snapshot", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--accelerator", default="auto", help="auto, cpu, gpu")
    p.add_argument("--devices", type=int, default=1, help="processes (devices) per node")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="auto: ddp when the world size is > 1")
    p.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32-true on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--ground-truth",
        choices=["none", "synthetic", "synthetic-hard"],
        default="none",
        help="also report true policy values from the synthetic generator (or its hard world)",
    )
    p.add_argument("--drift-at", default=None, help="drift date of that generator (ISO)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).removesuffix(" | None"), str)
            choices = SCHEDULES if f.name == "schedule" else None
            p.add_argument(flag, type=kind, default=None, choices=choices)
    return p.parse_args(argv)


def train_config(args: argparse.Namespace) -> TrainConfig:
    # an option not given is None (a flag: False); 0 is a value (`0 in (None, False)`
    # is true, so compare by identity)
    given = {
        f.name: v
        for f in fields(TrainConfig)
        if (v := getattr(args, f.name)) is not None and v is not False
    }
    return TrainConfig(**given)


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def build_trainer(
    args: argparse.Namespace, cfg: TrainConfig, train_rows: int
) -> tuple[L.Trainer, ModelCheckpoint]:
    gpu = _on_gpu(args.accelerator)
    world = args.devices * args.num_nodes
    strategy = args.strategy
    if strategy == "auto" and world > 1:
        strategy = "ddp"
    # The weights the schedule ends on (averaged) become the artifact, not those of the
    # epoch with the lowest validation loss: past the first epochs that loss rises a
    # little as the network sharpens its levels while its decisions keep improving, and
    # on noisy rewards its minimum is a matter of chance (an epoch-4 pick closed 0.68
    # of the hard world's gap where the last epoch closed 0.75). Validation still stops
    # a long training early (patience) and is reported.
    checkpoint = ModelCheckpoint(
        dirpath=args.out / "checkpoints",
        monitor=None,
        save_top_k=1,
        filename="epoch-{epoch}-{val_loss:.4f}",
    )
    callbacks = [checkpoint, EarlyStopping(monitor="val_loss", mode="min", patience=cfg.patience)]
    if cfg.ema_decay > 0:
        callbacks.append(WeightAveraging(avg_fn=ema(cfg.ema_decay)))
    if args.progress:
        callbacks.append(TQDMProgressBar(refresh_rate=20))
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        precision=args.precision or ("bf16-mixed" if gpu else "32-true"),
        max_epochs=cfg.epochs(train_rows, world),
        callbacks=callbacks,
        logger=TensorBoardLogger(args.out / "runs", name="train"),
        deterministic=True,
        enable_progress_bar=args.progress,
        enable_model_summary=False,
        log_every_n_steps=10,
        gradient_clip_val=cfg.gradient_clip or None,
    )
    return trainer, checkpoint


def _threads(args: argparse.Namespace) -> int:
    if args.threads:
        return args.threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", args.devices))
    return max(1, (os.cpu_count() or 1) // max(1, local))


def run(args: argparse.Namespace) -> TrainResult | None:
    cfg = train_config(args)
    torch.set_num_threads(_threads(args))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = SnapshotDataModule(args.snapshot, cfg)
    data.setup("fit")
    fz = data.featurizer
    model_cfg = ModelConfig.preset(
        cfg.preset, fz.vocab_size, fz.max_len, fz.word_offset, members=cfg.members
    )
    module = RewardRegressor(model_cfg.to_dict(), cfg.to_dict())
    trainer, checkpoint = build_trainer(args, cfg, len(data.train_df))
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started

    kept = RewardRegressor.load_from_checkpoint(
        checkpoint.best_model_path, map_location="cpu", weights_only=False
    )
    net = kept.net.float().cpu().eval()
    canary = artifact.canary_rows(data.holdout_df if len(data.holdout_df) else data.val_df)
    scores = artifact.AgentModel(net, fz, {}, {}, {}, [], {}).score(
        [(c["bot"], c["data_type"], c["input"], c["action"]) for c in canary]
    )
    rank = trainer.global_rank
    (args.out / "ranks").mkdir(parents=True, exist_ok=True)
    (args.out / "ranks" / f"{rank}.json").write_text(
        json.dumps(
            {"rank": rank, "world_size": trainer.world_size, "canary_scores": scores.tolist()}
        )
    )
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    return _finish(args, cfg, model_cfg, data, net, canary, trainer, seconds)


def _finish(args, cfg, model_cfg, data, net, canary, trainer, seconds) -> TrainResult:
    """Rank 0: evaluate on the holdout and write the artifact and result."""
    bank = artifact.action_bank(data.train_df)
    default_dt = artifact.default_data_types(data.train_df)
    world = (
        synthetic_world(args.drift_at, hard=args.ground_truth == "synthetic-hard")
        if args.ground_truth != "none"
        else None
    )
    val_loss = float(trainer.callback_metrics["val_loss"])  # of the weights kept
    # the ranking's lower bound: the validation error is the noise of one reward
    support = {
        "counts": artifact.bank_counts(data.train_df, bank),
        "pessimism": cfg.pessimism,
        "noise_sd": val_loss**0.5,
    }
    probe = artifact.AgentModel(
        net,
        data.featurizer,
        bank,
        default_dt,
        {},
        [],
        {},
        artifact.Support.from_json(support, bank),
    )
    train_mean = float(data.train_df["reward"].mean())
    metrics = evaluate(probe, data.holdout_df, train_mean, world) if len(data.holdout_df) else {}
    samples = len(data.train_df) * trainer.current_epoch
    metrics |= {
        "train_rows": len(data.train_df),
        "val_rows": len(data.val_df),
        "epochs": trainer.current_epoch,
        "train_seconds": seconds,
        "samples_per_s": samples / seconds if seconds else 0.0,
        "val_loss": val_loss,
        # numbers in the training rows that were NaN, infinite or beyond float range
        "missing_numbers": data.featurizer.missing_numbers,
    }
    manifest = json.loads((args.snapshot / "manifest.json").read_text())
    config = {
        "model": model_cfg.to_dict(),
        "train": cfg.to_dict(),
        "snapshot": {
            "path": str(args.snapshot),
            "sha256": manifest.get("sha256"),
            "rows": manifest.get("rows"),
            "window": manifest.get("window"),
        },
        "trainer": {
            "world_size": trainer.world_size,
            "num_nodes": args.num_nodes,
            "devices": args.devices,
            "precision": str(trainer.precision),
            "accelerator": type(trainer.accelerator).__name__,
        },
    }
    path = artifact.save(
        args.out / "artifact",
        net,
        data.featurizer,
        bank,
        default_dt,
        config,
        canary,
        metrics,
        support,
    )
    result = TrainResult(path, args.out / "runs", metrics, config)
    result.write(args.out)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.snapshot / "data.parquet").is_file():
        print(f"no snapshot at {args.snapshot} (data.parquet missing)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
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

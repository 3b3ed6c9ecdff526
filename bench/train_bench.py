"""Lightning's training throughput against a plain PyTorch loop, side by side in one run.

    python3 scripts/bench.py train_bench [--rows 10000] [--epochs 3] [--repeat 2] [--threads N]
    python3 scripts/bench.py train_bench --gpu      # large preset, bf16-mixed, also TFLOP/s

Same network, data, batch size, optimizer and threads; only the training loop
differs. Each side trains from the same initial weights, alternately, `--repeat`
times; the best samples/s of each is kept. Target: Lightning >= 0.9x the plain loop.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from model.config import TrainConfig
from model.module import RewardRegressor, SnapshotDataModule
from model.network import ModelConfig
from model.synthetic import World, write_snapshot

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(module: RewardRegressor, loader, epochs: int, device: str, bf16: bool) -> float:
    net = module.net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=module.lr, weight_decay=module.weight_decay)
    n = 0
    sync(device)
    t = time.perf_counter()
    for _ in range(epochs):
        for *x, reward, _weight in loader:
            x = [v.to(device) for v in x]
            reward = reward.to(device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                pred = net(*x).float()
            loss = torch.nn.functional.mse_loss(pred, reward)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(reward)
    sync(device)
    return n / (time.perf_counter() - t)


def lightning_loop(module: RewardRegressor, data, epochs: int, gpu: bool) -> float:
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=1,
        max_epochs=epochs,
        precision="bf16-mixed" if gpu else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    sync("cuda" if gpu else "cpu")
    t = time.perf_counter()
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    sync("cuda" if gpu else "cpu")
    return len(data.train_set) * epochs / (time.perf_counter() - t)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def flops_per_sample(module: RewardRegressor, loader, device: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    net = module.net.to(device)
    *x, reward, _weight = next(iter(loader))
    x = [v.to(device) for v in x]
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = torch.nn.functional.mse_loss(net(*x).float(), reward.to(device))
        loss.backward()
    return counter.get_total_flops() / len(reward)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--gpu", action="store_true", help="large preset with bf16-mixed on CUDA")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if args.gpu else "cpu"
    cfg = TrainConfig(preset="large" if args.gpu else "small")
    if args.batch_size:
        cfg.batch_size = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        snap = write_snapshot(Path(tmp) / "snap", args.rows, World(seed=1))
        data = SnapshotDataModule(snap, cfg)
        data.setup("fit")
        fz = data.featurizer
        L.seed_everything(0, verbose=False)
        base = RewardRegressor(
            ModelConfig.preset(cfg.preset, fz.vocab_size, fz.max_len, fz.word_offset).to_dict(),
            cfg.to_dict(),
        )
        loader = data.train_dataloader()
        print(
            f"{args.rows} rows ({len(data.train_set)} train), batch {cfg.batch_size}, "
            f"{args.epochs} epochs, {args.threads} threads, preset {cfg.preset}, {device}"
        )
        best_plain = best_light = 0.0
        for i in range(args.repeat):
            best_plain = max(
                best_plain, plain_loop(copy.deepcopy(base), loader, args.epochs, device, args.gpu)
            )
            best_light = max(
                best_light, lightning_loop(copy.deepcopy(base), data, args.epochs, args.gpu)
            )
            print(
                f"  round {i + 1}: plain {best_plain:,.0f}  lightning {best_light:,.0f} "
                "samples/s (best so far)"
            )
        print(
            f"plain PyTorch {best_plain:,.0f} samples/s   Lightning {best_light:,.0f} samples/s"
            f"   ratio {best_light / best_plain:.2f}"
        )
        if args.gpu:
            flops = flops_per_sample(copy.deepcopy(base), loader, device)
            print(
                f"training FLOPs/sample {flops:.3g}; achieved "
                f"{flops * best_light / 1e12:.2f} TFLOP/s (Lightning, bf16-mixed)"
            )


if __name__ == "__main__":
    main()

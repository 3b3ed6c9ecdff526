"""The promotion gate against retrains on unchanged data and deliberately worse models.

    python bench/gate_bench.py [--rows 3000] [--n 10] [--jobs 2] [--margins 0.02,0.05,0.1,0.2]

On one synthetic snapshot: a champion (seed 0), `--n` retrains on the same data
with other seeds (as good, up to noise), and `--n` worse challengers (half trained
for one epoch, half on shuffled rewards). Every challenger is scored with the
champion on the same temporal holdout and judged by the gate at each margin.
Prints, per margin, how many unchanged retrains pass and how many worse ones pass
(target: none of the worse, most of the unchanged), plus each pair's figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.settings import GateSpec  # noqa: E402
from flows.gate import decide  # noqa: E402
from model.artifact import load  # noqa: E402
from model.evaluation import evaluate, per_row, synthetic_world  # noqa: E402
from model.metrics import paired_bootstrap_ci  # noqa: E402
from model.module import read_snapshot, temporal_split  # noqa: E402
from model.result import TrainResult  # noqa: E402
from tests.helpers import model_train_command, synthetic_snapshot  # noqa: E402


def train(snap: Path, out: Path, seed: int, extra: list[str], threads: int) -> Path:
    cmd = model_train_command(snap, out, seed, "--threads", str(threads), *extra)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"training {out.name} failed:\n{r.stderr[-2000:]}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--margins", default="0.02,0.05,0.1,0.2")
    args = p.parse_args()
    margins = [float(m) for m in args.margins.split(",")]
    root = Path(tempfile.mkdtemp(prefix="valifi-gate-bench-"))
    snap = synthetic_snapshot(root / "snap", args.rows, seed=0)
    jobs = [("champion", 0, [])]
    jobs += [(f"retrain-{i}", i, []) for i in range(1, args.n + 1)]
    jobs += [
        (
            f"one-epoch-{i}" if i % 2 else f"shuffled-{i}",
            100 + i,
            ["--max-epochs", "1"] if i % 2 else ["--shuffle-rewards"],
        )
        for i in range(args.n)
    ]
    threads = max(1, 2 // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        outs = dict(
            zip(
                [j[0] for j in jobs],
                pool.map(lambda j: train(snap, root / j[0], j[1], j[2], threads), jobs),
                strict=True,
            )
        )
    df = read_snapshot(snap)
    cfg = TrainResult.read(outs["champion"]).train_config
    train_df, _, holdout = temporal_split(df, cfg["val_fraction"], cfg["holdout_fraction"])
    mean = float(train_df["reward"].mean())
    world = synthetic_world(None)
    champ = load(outs["champion"] / "artifact")
    champ_m = evaluate(champ, holdout, mean, world)
    champ_err = per_row(champ, holdout)["sq_err"]
    print(
        f"snapshot {args.rows} rows, holdout {len(holdout)}; champion MSE "
        f"{champ_m['rmse'] ** 2:.4f}, true policy value {champ_m['true_value_policy']:.3f}"
    )
    print(
        "| challenger | MSE diff | 95% CI | upper bound / champion MSE | true value diff | floors |"
    )
    print("|---|---|---|---|---|---|")
    passed = {m: {"retrain": 0, "worse": 0} for m in margins}
    for name, out in outs.items():
        if name == "champion":
            continue
        model = load(out / "artifact")
        m = evaluate(model, holdout, mean, world)
        err = per_row(model, holdout)["sq_err"]
        kind = "retrain" if name.startswith("retrain") else "worse"
        for margin in margins:
            d = decide(GateSpec(margin=margin), m, err, champ_m, champ_err, "1")
            passed[margin][kind] += d.passed
        mean_d, lo, hi = paired_bootstrap_ci(err, champ_err)
        floors = "met" if "floors met" in d.summary() else d.reasons[0]
        print(
            f"| {name} | {mean_d:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {hi / champ_err.mean():+.1%} | "
            f"{m['true_value_policy'] - champ_m['true_value_policy']:+.3f} | {floors} |"
        )
    print()
    print("| margin (x champion MSE) | unchanged retrains promoted | worse promoted |")
    print("|---|---|---|")
    for margin in margins:
        print(
            f"| {margin:.0%} | {passed[margin]['retrain']}/{args.n} | "
            f"{passed[margin]['worse']}/{args.n} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The promotion gate against the truth: pairs whose true policy values are known.

    python3 scripts/bench.py gate_bench [--rows 4000] [--n 6] [--jobs 2] [--margin 0.1] [--drift]
                               [--nights N]

On the synthetic world (true rewards known), one snapshot and a champion trained
on it (seed 0), then challengers, each judged by the gate against its champion on
the same temporal holdout:

- unchanged: retrains on the same data with other seeds;
- worse: trained for one epoch, on shuffled rewards, or without the `indicators`
  input field (a feature dropped);
- better: the same retrains judged against a champion trained on a fifth of the
  rows (more data), and with `--drift` the retrain after a drift of the reward rule
  against the champion from before it.

Each pair's truth is its true policy value difference on the holdout (beyond
+-`--tol`: truly better or worse). The gate is applied twice: on the squared error
alone (`value_check=false`) and as shipped (error, then the doubly-robust value
when well conditioned: non-inferiority, or no shown loss when the interval is wider
than the margin). Prints every pair, then how often each gate promoted a truly
worse policy (target 0) and rejected a truly better one (target at most 10%).

With `--nights N`, the lucky champion: of the champion and its retrains, the one
whose decisions are truly best keeps `Production`, and on each of N later nights a
retrain on that night's fresh log (same recipe, another seed) is judged against it on
that night's holdout. Prints each night's verdict and truth, and the longest run of
nights on which a retrain that was not truly worse was rejected.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.settings import GateSpec
from flows.gate import compare_on_holdout as compare
from model.artifact import load
from model.evaluation import synthetic_world
from model.result import TrainResult
from model.snapshot import read_rows, temporal_split
from model.synthetic import World, write_snapshot
from valifi.experiments import drift_recovery, train_command

ROOT = Path(__file__).resolve().parents[1]


def train(snap: Path, out: Path, seed: int, extra: list[str], threads: int) -> Path:
    cmd = train_command(snap, out, seed, "--threads", str(threads), *extra)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"training {out.name} failed:\n{r.stderr[-2000:]}")
    return out


def without_field(snap: Path, out: Path, field: str) -> Path:
    """A copy of `snap` whose inputs lack `field` (a feature the model never sees)."""
    out.mkdir(parents=True)
    table = pq.read_table(snap / "data.parquet")
    inputs = []
    for text in table["input"].to_pylist():
        doc = json.loads(text)
        doc.pop(field, None)
        inputs.append(json.dumps(doc, sort_keys=True))
    i = table.schema.get_field_index("input")
    pq.write_table(table.set_column(i, "input", pa.array(inputs)), out / "data.parquet")
    (out / "manifest.json").write_text((snap / "manifest.json").read_text())
    return out


def true_value(model, holdout, world) -> float:
    bots, inputs = list(holdout["bot"]), list(holdout["input"])
    chosen = model.choose(bots, inputs, list(holdout["data_type"]))
    return float(
        np.mean([world.true_reward(b, x, a) for b, x, a in zip(bots, inputs, chosen, strict=True)])
    )


def nights(args, root: Path, lucky: str, champion, threads: int) -> None:
    """Retrains on N fresh nightly logs judged against the lucky champion."""
    from datetime import UTC, datetime, timedelta

    start = datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    snaps = [
        write_snapshot(
            root / f"night-{k}", args.rows, World(seed=200 + k), end=start + timedelta(days=k)
        )
        for k in range(1, args.nights + 1)
    ]
    with ThreadPoolExecutor(args.jobs) as pool:
        outs = list(
            pool.map(
                lambda k: train(snaps[k - 1], root / f"retrain-night-{k}", k, [], threads),
                range(1, args.nights + 1),
            )
        )
    world = synthetic_world(None)
    print(f"\nlucky champion: {lucky}; each night a retrain on that night's log is judged")
    print("| night | true value diff | truth | gate | MSE upper bound / margin | DR test |")
    print("|---|---|---|---|---|---|")
    streak = longest = 0
    for k, (snap, out) in enumerate(zip(snaps, outs, strict=True), start=1):
        cfg = TrainResult.read(out).train_config
        train_df, _, holdout = temporal_split(
            read_rows(snap), cfg["val_fraction"], cfg["holdout_fraction"]
        )
        new = load(out / "artifact")
        d = compare(GateSpec(margin=args.margin), new, champion, train_df, holdout, "lucky")
        diff = true_value(new, holdout, world) - true_value(champion, holdout, world)
        truth = truth_of(diff, args.tol)
        blocked = not d.passed and truth != "worse"
        streak = streak + 1 if blocked else 0
        longest = max(longest, streak)
        m = d.mse_diff or {}
        v = d.value or {}
        print(
            f"| {k} | {diff:+.4f} | {truth} | {'promote' if d.passed else 'reject'} | "
            f"{m.get('high', float('nan')):+.4f} / {m.get('margin', float('nan')):+.4f} | "
            f"{v.get('test') if v.get('checked') else 'not applied'} |"
        )
    print(f"longest run of nights a retrain not truly worse was kept out: {longest}")


def truth_of(diff: float, tol: float) -> str:
    return "better" if diff > tol else "worse" if diff < -tol else "same"


def train_all(args, root: Path) -> tuple[dict, Path]:
    """Every model of the pairs, trained `args.jobs` at a time: name -> output folder;
    and the snapshot they are judged on."""
    snap = write_snapshot(root / "snap", args.rows, World(seed=0))
    small = write_snapshot(root / "small", args.rows // 5, World(seed=50))
    blind = without_field(snap, root / "blind", "indicators")
    jobs = [("champion", snap, 0, []), ("small-champion", small, 0, [])]
    jobs += [(f"retrain-{i}", snap, i, []) for i in range(1, args.n + 1)]
    worse = {"one-epoch": ["--max-epochs", "1"], "shuffled": ["--shuffle-rewards"]}
    for i in range(args.n):
        kind = ("one-epoch", "shuffled", "no-indicators")[i % 3]
        data = blind if kind == "no-indicators" else snap
        jobs.append((f"{kind}-{i}", data, 100 + i, worse.get(kind, [])))
    threads = max(1, 2 // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        done = pool.map(lambda j: train(j[1], root / j[0], j[2], j[3], threads), jobs)
        return dict(zip([j[0] for j in jobs], done, strict=True)), snap


def judge_pairs(args, models: dict, values: dict, train_df, holdout) -> list[tuple]:
    """Each pair judged by both gates, printed; (truth, {gate: promoted}) per pair."""
    pairs = [(name, "champion") for name in models if name not in ("champion", "small-champion")]
    pairs += [(f"retrain-{i}", "small-champion") for i in range(1, args.n + 1)]
    print(
        "| challenger | against | true value diff | truth | error only | as shipped "
        "| DR diff, value test |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = []
    for new, old in pairs:
        diff = values[new] - values[old]
        truth = truth_of(diff, args.tol)
        verdicts = {
            g: compare(spec, models[new], models[old], train_df, holdout, old)
            for g, spec in gates(args).items()
        }
        rows.append((truth, {g: d.passed for g, d in verdicts.items()}))
        shipped = verdicts["as shipped"].value
        d = shipped.get("diff") or {}
        dr = f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d else "—"
        dr += f", {shipped['test'] if shipped.get('checked') else 'not applied'}"
        print(
            f"| {new} | {old} | {diff:+.4f} | {truth} | "
            + " | ".join("promote" if v.passed else "reject" for v in verdicts.values())
            + f" | {dr} |"
        )
    return rows


def gates(args) -> dict[str, GateSpec]:
    return {
        "error only": GateSpec(margin=args.margin, value_check=False),
        "as shipped": GateSpec(margin=args.margin),
    }


def drift_row(args, root: Path) -> tuple:
    """The retrain after a drift against the champion from before it, printed."""
    r = drift_recovery(root / "drift", args.rows)
    diff = r["challenger_after"] - r["champion_after"]
    truth = truth_of(diff, args.tol)
    print(
        f"| retrain after drift | champion before it | {diff:+.4f} | {truth} | — | "
        f"{'promote' if r['decision'].passed else 'reject'} | "
        f"{r['decision'].value['diff']['mean']:+.4f}, {r['decision'].value['test']} |"
    )
    print(
        f"\ndrift: the champion earned {r['champion_before']:.4f} before the drift and "
        f"{r['champion_after']:.4f} after; the retrain earns {r['challenger_after']:.4f}: "
        f"{r['recovered']:.0%} of the loss recovered"
    )
    return truth, {"error only": None, "as shipped": r["decision"].passed}


def tally(args, rows: list[tuple]) -> None:
    print("\n| gate | truly worse promoted | truly better rejected | same promoted |")
    print("|---|---|---|---|")
    for g in gates(args):
        judged = [(t, v[g]) for t, v in rows if v[g] is not None]

        def count(kind, promoted, judged=judged):
            of = [v for t, v in judged if t == kind]
            return f"{sum(v == promoted for v in of)}/{len(of)}"

        print(
            f"| {g} | {count('worse', True)} | {count('better', False)} | {count('same', True)} |"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--tol", type=float, default=0.005, help="true value difference that counts")
    p.add_argument("--margin", type=float, default=GateSpec().margin)
    p.add_argument("--drift", action="store_true", help="also the retrain after a drift")
    p.add_argument("--nights", type=int, default=0, help="nights judged against the lucky one")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="valifi-gate-bench-"))
    outs, snap = train_all(args, root)
    models = {name: load(out / "artifact") for name, out in outs.items()}
    cfg = TrainResult.read(outs["champion"]).train_config
    train_df, _, holdout = temporal_split(
        read_rows(snap), cfg["val_fraction"], cfg["holdout_fraction"]
    )
    world = synthetic_world(None)
    values = {name: true_value(m, holdout, world) for name, m in models.items()}
    print(
        f"snapshot {args.rows} rows, holdout {len(holdout)} rows; true value of the champion "
        f"{values['champion']:.4f}, of the small champion {values['small-champion']:.4f}"
    )
    rows = judge_pairs(args, models, values, train_df, holdout)
    if args.drift:
        rows.append(drift_row(args, root))
    if args.nights:
        same = ["champion", *(f"retrain-{i}" for i in range(1, args.n + 1))]
        lucky = max(same, key=lambda name: values[name])
        nights(args, root, lucky, models[lucky], max(1, 2 // args.jobs))
    tally(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The value of the decisions: our model against what a practitioner would pick instead.

    python3 scripts/bench.py policy_bench [--sizes 1000 10000 100000] [--seeds 0 1 2 3 4]
                                 [--world hard] [--members 1 3] [--variant 'NAME=OPTIONS']
                                 [--no-vw] [--pessimism 0 1 2 3]

Needs the development extras (`vowpalwabbit`, `lightgbm`). On the synthetic world
(true rewards known), for each size and seed: one snapshot drawn with that seed, split
by time as training splits it (the newest 20% is the holdout). Every learner trains on
the rows before the holdout; each then picks one action per holdout context, and the
table gives the true mean reward of those picks and the share of the behaviour→oracle
gap closed. With several seeds, a summary per size follows: each learner's mean over
the seeds, its worst seed, and its worst seed against LightGBM's on the same log (the
smallest difference of the gaps closed). At 1k rows the holdout has 200 contexts, so
one seed is a noisy judge: compare over five.

- ours: `python -m model.train` with its defaults (and with `--members 3 ...`, an
  ensemble of that many networks, for each count given; with `--variant`, any other
  options of the training, e.g. `--variant 'joint=--interaction joint'`);
- Vowpal Wabbit's contextual bandit learner with action-dependent features
  (`--cb_adf --cb_type dr`, context × action interactions, 3 passes), costs = -reward,
  logged probabilities estimated by model/offpolicy.py's behaviour model;
- LightGBM: a reward model over flattened context and action features, used as a
  direct-method policy (the best predicted reward among the bot's actions);
- the behaviour policy (the logged actions), the most frequent action per bot, and
  the oracle.

`--pessimism K ...` ranks each of ours' choices again with the lower bound's pessimism
at each K (`--pessimism` of the training; the same trained networks, so only the
ranking changes), as rows "NAME, pessimism K".

`--world hard` runs on the generator's harder world (more and parameterised actions,
noisier rewards, a best action the behaviour policy almost never tries).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from model.artifact import Support, action_bank, load
from model.config import TrainConfig
from model.features import canonical_json, leaves
from model.offpolicy import Behaviour
from model.snapshot import read_rows, temporal_split
from model.synthetic import World, write_snapshot
from valifi.experiments import train_command

ROOT = Path(__file__).resolve().parents[1]

UNSAFE = re.compile(r"[\s:|]")


def _flat(doc, prefix: str) -> dict:
    """Numbers as values, short strings and booleans as indicators."""
    out = {}
    for path, v in leaves(doc, prefix):
        if isinstance(v, bool | str):
            if len(str(v)) <= 64:
                out[f"{path}={v}"] = 1.0
        elif isinstance(v, int | float) and np.isfinite(v):
            out[path] = float(v)
    return out


def _vw_features(feats: dict) -> str:
    return " ".join(
        f"{UNSAFE.sub('_', k)}:{v:.6g}" if v != 1.0 else UNSAFE.sub("_", k)
        for k, v in feats.items()
    )


def _context(bot, dt, x) -> dict:
    return {f"bot={bot}": 1.0, f"dt={dt}": 1.0, **_flat(x, "in")}


class VWPolicy:
    def __init__(self, train, bank, propensity, passes: int = 3, seed: int = 0):
        import vowpalwabbit

        self.bank = bank
        self.vw = vowpalwabbit.Workspace(
            f"--cb_adf --cb_type dr -q CA --quiet --random_seed {seed}"
        )
        examples = []
        for (bot, dt, x, a, r), p in zip(train, propensity, strict=True):
            key = canonical_json(a)
            lines = [f"shared |C {_vw_features(_context(bot, dt, x))}"]
            for b in bank[bot]:
                label = f"0:{-r:.6g}:{p:.6g} " if canonical_json(b) == key else ""
                lines.append(f"{label}|A {_vw_features(_flat(b, 'act'))}")
            examples.append(lines)
        rng = np.random.default_rng(seed)
        for _ in range(passes):
            for i in rng.permutation(len(examples)):
                self.vw.learn(examples[i])

    def choose(self, bot, dt, x):
        lines = [f"shared |C {_vw_features(_context(bot, dt, x))}"]
        lines += [f"|A {_vw_features(_flat(b, 'act'))}" for b in self.bank[bot]]
        costs = self.vw.predict(lines)
        return self.bank[bot][int(np.argmin(costs))]


class LightGBMPolicy:
    def __init__(self, train, bank, seed: int = 0):
        import lightgbm
        from sklearn.feature_extraction import DictVectorizer

        self.bank = bank
        self.vec = DictVectorizer()
        X = self.vec.fit_transform(
            [_context(b, dt, x) | _flat(a, "act") for b, dt, x, a, _ in train]
        )
        y = np.array([r for *_, r in train])
        self.model = lightgbm.LGBMRegressor(
            n_estimators=400, learning_rate=0.05, num_leaves=31, random_state=seed, verbose=-1
        ).fit(X, y)

    def choose_many(self, rows):
        feats, index = [], []
        for i, (bot, dt, x) in enumerate(rows):
            for b in self.bank[bot]:
                feats.append(_context(bot, dt, x) | _flat(b, "act"))
                index.append(i)
        pred = self.model.predict(self.vec.transform(feats))
        best: dict[int, tuple[float, dict]] = {}
        k = 0
        for i, (bot, _, _) in enumerate(rows):
            for b in self.bank[bot]:
                if i not in best or pred[k] > best[i][0]:
                    best[i] = (pred[k], b)
                k += 1
        return [best[i][1] for i in range(len(rows))]


def _ours(snap: Path, out: Path, seed: int, args: list[str]):
    r = subprocess.run(
        train_command(snap, out, seed, "--threads", "2", *args),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return load(out / "artifact")


LIGHTGBM = "LightGBM direct method"
BEHAVIOUR = "behaviour (logged)"


def run(
    size: int,
    seed: int,
    root: Path,
    hard: bool = False,
    variants: dict[str, list[str]] | None = None,
    vw: bool = True,
    pessimism: tuple[float, ...] = (),
) -> dict:
    """Every learner on one log of `size` rows drawn with `seed`: the true mean reward
    of its choices on the holdout contexts, and its training seconds; each of ours
    also ranked with each of `pessimism`."""
    variants = variants if variants is not None else {"ours": []}
    world = World(seed=seed, hard=hard)
    snap = write_snapshot(root / f"snap-{size}-{seed}", size, World(seed=seed, hard=hard))
    cfg = TrainConfig()
    df = read_rows(snap)
    train_df, val_df, holdout = temporal_split(df, cfg.val_fraction, cfg.holdout_fraction)
    learn = pd.concat([train_df, val_df])
    rows = list(
        zip(
            learn["bot"],
            learn["data_type"],
            learn["input"],
            learn["action"],
            learn["reward"],
            strict=True,
        )
    )
    bank = action_bank(learn)
    hold = list(zip(holdout["bot"], holdout["data_type"], holdout["input"], strict=True))
    bots, data_types, inputs = (list(holdout[c]) for c in ("bot", "data_type", "input"))

    def value(actions) -> float:
        return float(
            np.mean(
                [world.true_reward(b, x, a) for (b, _, x), a in zip(hold, actions, strict=True)]
            )
        )

    seconds: dict[str, float] = {}
    values: dict[str, float] = {}
    for i, (name, args) in enumerate(variants.items()):
        t = time.perf_counter()
        out = root / f"ours-{size}-{seed}-{i}"
        ours = _ours(snap, out, seed, args)
        seconds[name] = time.perf_counter() - t
        values[name] = value(ours.choose(bots, inputs, data_types))
        noise = saved_noise(out / "artifact") if pessimism else 0.0
        for k in pessimism:
            ours.support = with_pessimism(ours.support, noise, k)
            values[f"{name}, pessimism {k:g}"] = value(ours.choose(bots, inputs, data_types))
    if vw:
        t = time.perf_counter()
        behaviour = Behaviour(list(learn["bot"]), list(learn["input"]), list(learn["action"]))
        propensity, _ = behaviour.propensity(
            list(learn["bot"]), list(learn["input"]), list(learn["action"])
        )
        vw_policy = VWPolicy(rows, bank, propensity, seed=seed)
        seconds["vw"] = time.perf_counter() - t
        values["Vowpal Wabbit cb_adf (DR)"] = value([vw_policy.choose(*h) for h in hold])
    t = time.perf_counter()
    gbm = LightGBMPolicy(rows, bank, seed=seed)
    seconds["lightgbm"] = time.perf_counter() - t
    frequent = {}  # each bot's most frequent action (counted by its canonical JSON)
    for bot, group in learn.groupby("bot"):
        keys = group["action"].map(canonical_json)
        frequent[bot] = dict(zip(keys, group["action"], strict=True))[keys.value_counts().index[0]]
    values |= {
        LIGHTGBM: value(gbm.choose_many(hold)),
        BEHAVIOUR: value(list(holdout["action"])),
        "most frequent action": value([frequent[h[0]] for h in hold]),
        "oracle": value([world.oracle_action(h[0], h[2]) for h in hold]),
    }
    return {"values": values, "seconds": seconds, "holdout": len(hold), "train": len(rows)}


def saved_noise(artifact: Path) -> float:
    """The noise of one reward the artifact at `artifact` was trained with (saved beside
    the counts of its support)."""
    return float(json.loads((artifact / "action_bank.json").read_text())["support"]["noise_sd"])


def with_pessimism(support: Support, noise: float, pessimism: float) -> Support:
    """`support` with its penalty for `pessimism` standard errors of `noise`."""
    return dataclasses.replace(support, penalty=pessimism * noise)


def gaps(values: dict[str, float]) -> dict[str, float]:
    """Each learner's share of the behaviour-to-oracle gap closed."""
    lo, hi = values[BEHAVIOUR], values["oracle"]
    return {k: (v - lo) / (hi - lo) if hi > lo else float("nan") for k, v in values.items()}


def summary(results: list[dict]) -> list[tuple[str, float, float, float, float]]:
    """Over seeds, per learner: mean true reward, mean gap closed, worst seed's gap
    closed, and the worst seed's gap closed less LightGBM's on that seed."""
    out = []
    per_seed = [gaps(r["values"]) for r in results]
    for name in results[0]["values"]:
        v = [r["values"][name] for r in results]
        g = [seed[name] for seed in per_seed]
        behind = [seed[name] - seed[LIGHTGBM] for seed in per_seed]
        out.append((name, float(np.mean(v)), float(np.mean(g)), min(g), min(behind)))
    return out


def _variants(args: argparse.Namespace) -> dict[str, list[str]]:
    variants = {"ours": []}
    for m in args.members:
        if m > 1:
            variants[f"ours, {m} members"] = ["--members", str(m)]
    for v in args.variant:
        name, _, extra = v.partition("=")
        variants[name.strip()] = extra.split()
    if args.only_variants:
        variants.pop("ours")
    return variants


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one log per seed")
    p.add_argument("--seed", type=int, help="one seed (the same as --seeds SEED)")
    p.add_argument("--world", choices=["default", "hard"], default="default")
    p.add_argument(
        "--members", type=int, nargs="+", default=[1], help="ours with each number of members"
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OPTIONS",
        help="ours trained with these options of python -m model.train as well "
        "(repeatable), e.g. 'wide=--lr 0.002'",
    )
    p.add_argument("--only-variants", action="store_true", help="leave out plain ours")
    p.add_argument("--no-vw", action="store_true", help="leave out Vowpal Wabbit")
    p.add_argument(
        "--pessimism",
        type=float,
        nargs="+",
        default=[],
        help="also rank ours' choices with each of these pessimisms (no training)",
    )
    args = p.parse_args()
    seeds = [args.seed] if args.seed is not None else args.seeds
    variants = _variants(args)
    root = Path(tempfile.mkdtemp(prefix="valifi-policy-bench-"))
    print(f"world: {args.world}; seeds: {' '.join(map(str, seeds))}")
    for size in args.sizes:
        results = []
        for seed in seeds:
            r = run(
                size,
                seed,
                root,
                args.world == "hard",
                variants,
                not args.no_vw,
                tuple(args.pessimism),
            )
            results.append(r)
            g = gaps(r["values"])
            print(
                f"\n{size:,} rows, seed {seed} ({r['train']:,} to learn from, "
                f"{r['holdout']:,} holdout contexts); training seconds: "
                + ", ".join(f"{k} {s:.0f}" for k, s in r["seconds"].items())
            )
            print("| policy | true mean reward | gap closed |")
            print("|---|---|---|")
            for name, val in r["values"].items():
                print(f"| {name} | {val:.4f} | {g[name]:.3f} |")
            sys.stdout.flush()
        if len(seeds) > 1:
            print(f"\n{size:,} rows over {len(seeds)} seeds:")
            print(
                "| policy | mean true reward | mean gap closed | worst seed "
                "| worst seed - LightGBM |"
            )
            print("|---|---|---|---|---|")
            for name, val, gap, worst, behind in summary(results):
                print(f"| {name} | {val:.4f} | {gap:.3f} | {worst:.3f} | {behind:+.3f} |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

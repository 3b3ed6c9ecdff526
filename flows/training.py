"""Train in processes of their own and score the challenger against the champion.

Training runs as `python -m model.train` (so Lightning's DDP launcher can start
its ranks) in a process group of its own, under a timeout: a run that takes
longer is killed, group and all, and nothing is registered.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from core.processes import stop_group
from core.registry import Registry, RegistryError
from core.settings import GateSpec, TrainSpec
from flows.gate import GateDecision, decide, value_evidence
from model.result import TrainResult

ROOT = Path(__file__).resolve().parents[1]


class TrainingFailed(RuntimeError):
    """The training process failed or timed out; the message says why."""


def train_args(
    spec: TrainSpec,
    devices: int | None = None,
    num_nodes: int | None = None,
    max_epochs: int | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """Arguments for `python -m model.train` from the settings and the run's overrides."""
    args = [
        "--devices",
        str(devices or spec.devices),
        "--num-nodes",
        str(num_nodes or spec.num_nodes),
    ]
    if epochs := max_epochs or spec.max_epochs:
        args += ["--max-epochs", str(epochs)]
    if spec.members > 1:
        args += ["--members", str(spec.members)]
    if spec.pessimism is not None:
        args += ["--pessimism", str(spec.pessimism)]
    if spec.synthetic_ground_truth:
        args += ["--ground-truth", "synthetic"]
        if spec.synthetic_drift_at:
            args += ["--drift-at", spec.synthetic_drift_at]
    return args + list(extra or [])


def _arg(args: list[str], flag: str, default: int = 1) -> int:
    return int(args[args.index(flag) + 1]) if flag in args else default


def commands(snapshot: Path, out: Path, args: list[str]) -> list[list[str]]:
    """The processes one training needs on this machine.

    One `python -m model.train` (Lightning starts the ranks of its devices). With
    `--num-nodes` above 1 and no MASTER_ADDR (no cluster gives the nodes), the nodes
    run here: one `torchrun` agent per node, meeting at a local rendezvous, so two
    local "nodes" train one model (gloo on CPU) as two machines would.
    """
    train = ["-m", "model.train", "--snapshot", str(snapshot), "--out", str(out)]
    train += ["--no-progress", *args]
    nodes = _arg(args, "--num-nodes")
    if nodes <= 1 or os.environ.get("MASTER_ADDR"):
        return [[sys.executable, *train]]
    port = _free_port()
    return [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nodes}",
            f"--nproc-per-node={_arg(args, '--devices')}",
            f"--node-rank={rank}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            *train,
        ]
        for rank in range(nodes)
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(snapshot: Path, out: Path, args: list[str], timeout_s: float) -> TrainResult:
    """Run training to completion (or kill it at `timeout_s`); its log lands in OUT/train.log
    (with local nodes, node i's in OUT/train-node{i}.log as well)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    log = Path(out) / "train.log"
    cmds = commands(snapshot, out, args)
    logs = [log] + [Path(out) / f"train-node{i}.log" for i in range(1, len(cmds))]
    procs: list[subprocess.Popen] = []
    try:
        for cmd, path in zip(cmds, logs, strict=True):
            with path.open("w") as sink:
                procs.append(
                    subprocess.Popen(
                        cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
                    )
                )
        deadline = time.monotonic() + timeout_s
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise TrainingFailed(
                    f"training timed out after {timeout_s:g} s and was killed (log: {log})"
                ) from None
            if codes[-1] != 0:
                break  # one node failed: the others cannot finish
    finally:  # a timeout, a failed node or a cancelled run: take every process down
        for proc in procs:
            if proc.poll() is None:
                stop_group(proc)
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        i, code = failed[0]
        tail = "\n".join(logs[i].read_text(errors="replace").strip().splitlines()[-5:])
        where = f" on node {i}" if len(cmds) > 1 else ""
        raise TrainingFailed(f"training failed{where} (exit {code}): {tail}")
    try:
        return TrainResult.read(out)
    except FileNotFoundError:
        raise TrainingFailed(f"training exited 0 but wrote no result in {out}") from None


def judge(
    registry: Registry, result: TrainResult, snapshot: Path, spec: GateSpec, cache: Path
) -> GateDecision:
    """Score the challenger and the current champion on the same holdout; estimate
    the value of each one's decisions off-policy; apply the gate.

    A champion whose artifact cannot be loaded (corrupt, or without its files) serves
    nobody: the challenger is then judged on the floors alone, and the reason says so.
    """
    from model.artifact import ArtifactError, load
    from model.module import read_snapshot, temporal_split

    cfg = result.train_config
    df = read_snapshot(Path(snapshot))
    train_df, _, holdout = temporal_split(df, cfg["val_fraction"], cfg["holdout_fraction"])
    challenger = load(result.artifact)
    old = registry.champion()
    if old is None:
        return compare(spec, challenger, None, train_df, holdout)
    try:
        champ = load(registry.download(old, cache))
    except (ArtifactError, RegistryError) as exc:
        alone = f"v{old.version} cannot be loaded ({exc}): judged on floors alone"
        return compare(spec, challenger, None, train_df, holdout, old.version, alone)
    return compare(spec, challenger, champ, train_df, holdout, old.version)


def compare(
    spec: GateSpec,
    challenger,
    champion,
    train_df,
    holdout,
    version=None,
    alone: str = "no champion: judged on floors alone",
) -> GateDecision:
    """The gate on loaded models: metrics, paired errors and off-policy values on
    `holdout`, with the behaviour policy estimated from `train_df`.

    The two models are compared on the rows both can rank. Rows of a bot the champion
    does not know, or whose logged action only the challenger knows, are judged by the
    challenger alone and reported apart; with fewer than `min_holdout_rows` rows in
    common the challenger is judged on the floors alone, as a first model is.
    """
    from model.evaluation import evaluate, per_row
    from model.offpolicy import Behaviour

    train_mean = float(train_df["reward"].mean())
    new_pr = per_row(challenger, holdout)
    behaviour = Behaviour(list(train_df["bot"]), list(train_df["input"]), list(train_df["action"]))
    propensity, _ = behaviour.propensity(
        list(holdout["bot"]), list(holdout["input"]), list(holdout["action"])
    )
    reward = holdout["reward"].to_numpy(float)
    new_rows = _policy_rows(challenger, challenger, holdout, new_pr["pred"], propensity)
    new_metrics = evaluate(challenger, holdout, train_mean)
    if champion is None:
        value = value_evidence(spec, new_rows, None, reward)
        return decide(spec, new_metrics, new_pr["sq_err"], None, None, version, value, alone=alone)
    both, apart = _rows_apart(spec, challenger, champion, holdout, new_pr["sq_err"], new_rows)
    if both.sum() < spec.min_holdout_rows:
        value = value_evidence(spec, new_rows, None, reward)
        alone = (
            f"v{version} can rank only {int(both.sum())} of the {len(holdout)} holdout rows "
            f"(fewer than {spec.min_holdout_rows}): judged on floors alone"
        )
        return decide(spec, new_metrics, new_pr["sq_err"], None, None, version, value, apart, alone)
    common = holdout[both]
    # one reward model for both policies' direct and doubly-robust terms: the
    # challenger's, trained on the newest rows
    old_rows = _policy_rows(champion, challenger, common, new_pr["pred"][both], propensity[both])
    return decide(
        spec,
        new_metrics,
        new_pr["sq_err"][both],
        evaluate(champion, common, train_mean),
        per_row(champion, common)["sq_err"],
        version,
        value_evidence(spec, new_rows.subset(both), old_rows, reward[both]),
        apart,
    )


def _rows_apart(spec: GateSpec, challenger, champion, holdout, sq_err, rows):
    """(mask of the rows both models can rank, report of the others or None).

    The champion cannot rank a row of a bot it does not know, nor judge a logged action
    that the challenger knows and it does not; the challenger cannot rank a bot that
    only the newest rows show (it is in neither model).
    """
    from model.offpolicy import estimates

    bots, actions = list(holdout["bot"]), list(holdout["action"])
    new_knows = np.array([challenger.knows(b) for b in bots], bool)
    old_knows = np.array(
        [
            champion.knows(b) and (champion.knows_action(b, a) or not challenger.knows_action(b, a))
            for b, a in zip(bots, actions, strict=True)
        ],
        bool,
    )
    both = new_knows & old_knows
    alone = new_knows & ~old_knows
    if both.all():
        return both, None
    new_bots = sorted({b for b, k in zip(bots, alone, strict=True) if k and not champion.knows(b)})
    report = {
        "rows": int(alone.sum()),
        "bots": {b: int(sum(x == b for x in np.asarray(bots)[alone])) for b in new_bots},
        "new_actions": int(sum(alone & np.array([champion.knows(b) for b in bots], bool))),
        "unranked": int((~new_knows).sum()),  # bots no model knows: judged by neither
        "mse": float(np.mean(sq_err[alone])) if alone.any() else None,
        "value": None,
    }
    if alone.any():
        report["value"] = estimates(
            rows.subset(alone),
            n_boot=spec.ope_bootstrap,
            alpha=1 - spec.confidence,
            min_ess=spec.ope_min_ess,
        )
    return both, report


def _policy_rows(policy, critic, holdout, q_logged, propensity):
    """Per-row off-policy pieces of `policy`'s choices, valued by `critic`; where the
    policy knows no action (a bot it has never seen) the logged decision stands."""
    from model.offpolicy import PolicyRows

    bots, inputs, types = list(holdout["bot"]), list(holdout["input"]), list(holdout["data_type"])
    logged = list(holdout["action"])
    chosen = policy.choose(bots, inputs, types)
    scored = [a if c is None else c for c, a in zip(chosen, logged, strict=True)]
    q_chosen = critic.score(list(zip(bots, types, inputs, scored, strict=True)))
    return PolicyRows.build(q_chosen, q_logged, chosen, logged, propensity, holdout["reward"])

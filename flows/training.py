"""Train in processes of their own.

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

from core.processes import stop_group
from core.settings import TrainSpec
from model import config
from model.result import TrainResult

ROOT = Path(__file__).resolve().parents[1]


class TrainingFailed(RuntimeError):
    """The training process failed or timed out; the message says why."""


def train_options(spec: TrainSpec, extra: list[str] | tuple = ()) -> list[str]:
    """Options of `python -m model.train` for each training setting that differs from
    the training's own default (model.config derives them), then `extra` as given."""
    values = spec.model_dump(exclude={"timeout_s", "lock_wait_s"}) | {"progress": False}
    return config.options(values) + list(extra)


def commands(snapshot: Path, out: Path, spec: TrainSpec, extra=()) -> list[list[str]]:
    """The processes one training needs on this machine.

    One `python -m model.train` (Lightning starts the ranks of its devices). With
    more than one node and no MASTER_ADDR (no cluster gives the nodes), the nodes run
    here: one `torchrun` agent per node, meeting at a local rendezvous, so two local
    "nodes" train one model (gloo on CPU) as two machines would.
    """
    train = ["-m", "model.train", "--snapshot", str(snapshot), "--out", str(out)]
    train += train_options(spec, extra)
    if spec.num_nodes <= 1 or os.environ.get("MASTER_ADDR"):
        return [[sys.executable, *train]]
    port = _free_port()
    return [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={spec.num_nodes}",
            f"--nproc-per-node={spec.devices}",
            f"--node-rank={rank}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            *train,
        ]
        for rank in range(spec.num_nodes)
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(snapshot: Path, out: Path, spec: TrainSpec, extra=()) -> TrainResult:
    """Run training to completion (or kill it at `spec.timeout_s`); its log lands in
    OUT/train.log (with local nodes, node i's in OUT/train-node{i}.log as well)."""
    timeout_s = spec.timeout_s
    Path(out).mkdir(parents=True, exist_ok=True)
    log = Path(out) / "train.log"
    cmds = commands(snapshot, out, spec, extra)
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

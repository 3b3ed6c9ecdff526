"""Training on CPU: a smoke run, distributed runs, and the artifact round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.artifact import ArtifactError, load
from model.config import TrainConfig
from model.result import TrainResult
from model.synthetic import World, write_snapshot
from tests.helpers import ROOT, free_port, model_train_command

pytestmark = pytest.mark.slow

FAST = ["--max-epochs", "2", "--threads", "1"]


def _train(snapshot: Path, out: Path, *extra: str, env: dict | None = None, wait: bool = True):
    cmd = model_train_command(snapshot, out, None, *FAST, *extra)
    e = {**os.environ, **(env or {})}
    if not wait:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    r = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def small_snapshot(tmp_path_factory):
    return write_snapshot(tmp_path_factory.mktemp("snap"), 1500, World(seed=3))


def test_smoke_run_writes_a_loadable_artifact(small_snapshot, tmp_path):
    _train(small_snapshot, tmp_path)
    art = tmp_path / "artifact"
    assert {p.name for p in art.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "featurizer.json",
        "action_bank.json",
        "canary.json",
        "metrics.json",
    }
    assert not list(art.glob("*.pt")) and not list(art.glob("*.pkl"))
    result = TrainResult.read(tmp_path)
    assert result.artifact == art and result.metrics["rows"] > 0
    assert np.isfinite(result.metrics["rmse"])
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))  # TensorBoard
    # one checkpoint, of the last epoch, and the artifact holds its (averaged) weights
    (ckpt,) = (tmp_path / "checkpoints").glob("epoch-*.ckpt")
    assert f"epoch={result.metrics['epochs'] - 1}-" in ckpt.name
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    weights = load_file(art / "model.safetensors")
    assert weights.keys() == {k.removeprefix("net.") for k in state}
    assert all(torch.equal(weights[k.removeprefix("net.")], v.float()) for k, v in state.items())
    assert np.isfinite(result.metrics["val_loss"])
    doc = json.loads((art / "action_bank.json").read_text())
    bank = doc["bank"]
    assert set(bank) == {
        "trading_advanced",
        "financial_stocks",
        "analytics_portfolio",
        "platform_onboarding",
    }
    # the ranking's lower bound: each bank action's training rows and the model's noise
    support = doc["support"]
    # the pessimism by the snapshot's size, as the recipe saved with the model says
    train_rows = result.metrics["train_rows"]
    assert support["pessimism"] == TrainConfig().sized(train_rows).pessimism
    assert support["pessimism"] == result.config["train"]["pessimism"]
    assert support["noise_sd"] == pytest.approx(result.metrics["val_loss"] ** 0.5)
    assert sum(map(sum, support["counts"].values())) == train_rows
    assert all(len(support["counts"][b]) == len(bank[b]) for b in bank)
    assert all(ns == sorted(ns, reverse=True) and min(ns) > 0 for ns in support["counts"].values())
    model = load(art)
    # the settings by size: on a small snapshot more of the trees, more other actions per
    # row and less pessimism, and the recipe saved says what was used
    recipe = model.config["train"]
    assert recipe["distill_actions"] == 3 and 0.25 < recipe["distill_trees"] <= 0.75
    assert 1.0 < recipe["pessimism"] < 2.0
    (ranked,) = model.rank_many([("trading_advanced", {"indicators": {"rsi": 25.0}}, None)])
    for r in ranked:
        n = support["counts"]["trading_advanced"][bank["trading_advanced"].index(r.action)]
        margin = recipe["pessimism"] * support["noise_sd"] / n**0.5
        assert r.lower == pytest.approx(r.score - margin, abs=1e-5)
    assert [r.lower for r in ranked] == sorted((r.lower for r in ranked), reverse=True)
    # another process reproduces the canary scores
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from model.artifact import load; print(load(sys.argv[1]).verify())",
            str(art),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    assert float(check.stdout) < 1e-4


def test_an_ensemble_trains_and_loads_as_one_artifact(small_snapshot, tmp_path):
    _train(small_snapshot, tmp_path, "--members", "2")
    model = load(tmp_path / "artifact")  # verifies the canaries
    assert model.config["model"]["members"] == 2 and len(model.net.members) == 2
    assert model.config["train"]["members"] == 2
    assert {k.split(".")[1] for k in load_file(tmp_path / "artifact" / "model.safetensors")} == {
        "0",
        "1",
    }


def test_corrupt_weights_fail_the_canary_check(small_snapshot, tmp_path):
    _train(small_snapshot, tmp_path)
    art = tmp_path / "artifact"
    from safetensors.torch import load_file, save_file

    weights = load_file(art / "model.safetensors")
    name = next(k for k in weights if k.startswith("head"))
    weights[name] = weights[name] + 0.5
    save_file(weights, art / "model.safetensors")
    with pytest.raises(ArtifactError, match="canary scores differ"):
        load(art)
    (art / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="cannot load"):
        load(art)


def _rank_scores(out: Path) -> dict[int, list[float]]:
    return {
        int(p.stem): json.loads(p.read_text())["canary_scores"]
        for p in (out / "ranks").glob("*.json")
    }


def test_ddp_two_processes_on_one_machine(small_snapshot, tmp_path):
    _train(small_snapshot, tmp_path, "--devices", "2", "--accelerator", "cpu")
    scores = _rank_scores(tmp_path)
    assert set(scores) == {0, 1}
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-6)
    cfg = json.loads((tmp_path / "artifact" / "config.json").read_text())
    assert cfg["trainer"]["world_size"] == 2
    assert load(tmp_path / "artifact").verify() < 1e-4


def test_two_nodes_on_localhost_form_one_group(small_snapshot, tmp_path):
    port = str(free_port())
    procs = [
        _train(
            small_snapshot,
            tmp_path,
            "--num-nodes",
            "2",
            "--devices",
            "1",
            "--accelerator",
            "cpu",
            "--strategy",
            "ddp",
            wait=False,
            env={
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "NODE_RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": "0",
            },
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    scores = _rank_scores(tmp_path)
    assert set(scores) == {0, 1}
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-6)
    assert (
        json.loads((tmp_path / "artifact" / "config.json").read_text())["trainer"]["num_nodes"] == 2
    )


@pytest.mark.gpu
def test_gpu_bf16_run(small_snapshot, tmp_path):
    _train(small_snapshot, tmp_path, "--accelerator", "gpu", "--precision", "bf16-mixed")
    cfg = json.loads((tmp_path / "artifact" / "config.json").read_text())
    assert "bf16" in cfg["trainer"]["precision"]
    assert load(tmp_path / "artifact").verify() < 1e-3


# The last commit before the artifact's code was reorganised (model/config.py,
# model/snapshot.py, ModelConfig's defaults, to_tensors out of the Lightning module).
BEFORE_REORGANISATION = "e99c4b4"


def test_an_artifact_made_by_the_code_before_the_reorganisation_loads_and_scores(tmp_path):
    """`python -m model.train` of that commit (its own `model/` package) trains an
    artifact; today's code loads it, reproduces its canary scores and ranks with it."""
    import shutil
    import tarfile

    from model.decision import Query, decide

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", BEFORE_REORGANISATION, "model"],
        cwd=ROOT,
        capture_output=True,
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {BEFORE_REORGANISATION} is not in this clone's history")
    old = tmp_path / "old"
    old.mkdir()
    (tmp_path / "model.tar").write_bytes(archive.stdout)
    with tarfile.open(tmp_path / "model.tar") as tar:
        tar.extractall(old, filter="data")
    snap = write_snapshot(tmp_path / "snap", 800, World(seed=4))
    train = ["-m", "model.train", "--snapshot", str(snap), "--out", str(tmp_path / "o")]
    r = subprocess.run(
        [sys.executable, *train, "--max-epochs", "1", "--no-progress", "--threads", "1"],
        cwd=old,
        env={**os.environ, "PYTHONPATH": str(old)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    model = load(tmp_path / "o" / "artifact")  # verifies the canaries: scores as it did
    assert model.config["model"]["cross"] is True
    (made,) = decide(model, [Query.of("trading_advanced", "Find a trade", {"symbol": "AAPL"})])
    answer = made.answer
    assert answer["result"]["action"] in World().bots["trading_advanced"].actions

"""The import rules: a floor imports only from floors below it.

1 model/      the learning problem: no orchestration, registry, database or server code
2 core/       settings and the registry
3 flows/      Prefect flows       } peers: they share the core, never each other
3 serving/    the agent server    }
4 valifi/     the command, the local stack, seeding, deployment
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOOR = {"model": 1, "core": 2, "flows": 3, "serving": 3, "valifi": 4}
# Libraries the model must not depend on: it trains on a box with only torch and Lightning.
NOT_IN_MODEL = {"prefect", "mlflow", "psycopg", "psycopg2", "litserve", "great_expectations"}


def _imports(path: Path) -> set[str]:
    """Top-level names of every module `path` imports (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FLOOR))
def test_each_floor_imports_only_from_floors_below(package):
    bad = []
    for path in _modules(package):
        for name in _imports(path) & set(FLOOR):
            if name != package and FLOOR[name] >= FLOOR[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_the_model_stays_free_of_orchestration_and_serving_libraries():
    bad = [
        f"{p.relative_to(ROOT)} imports {n}"
        for p in _modules("model")
        for n in _imports(p) & NOT_IN_MODEL
    ]
    assert not bad, bad


def test_the_rules_see_real_imports():
    # the checker itself: flows do use the core, the command uses everything
    assert "core" in _imports(ROOT / "flows" / "pipeline.py")
    assert {"core", "flows", "serving"} <= set().union(*map(_imports, _modules("valifi")))
    assert len(_modules("serving")) >= 3 and len(_modules("core")) >= 3


def test_serving_a_model_imports_no_lightning(tmp_path):
    """Loading an artifact and answering with it (what both servers do) needs torch, not
    Lightning: a fresh interpreter, an artifact written without the trainer, then
    `model.artifact`, `model.decision` and the MLflow pyfunc's imports."""
    import subprocess
    import sys

    from core.registry import SERVING_REQUIREMENTS

    code = f"""
import sys
from model.features import Featurizer
from model.network import ModelConfig, build
from model import artifact
from model.decision import Query, decide
rows = [("bot", "market_data", {{"rsi": float(v)}}, {{"action": a}})
        for v in range(40) for a in "xy"]
fz = Featurizer.build(rows, max_len=16, min_count=1)
net = build(ModelConfig(fz.vocab_size, fz.max_len, num_paths=fz.word_offset))
bank = {{"bot": [{{"action": "x"}}, {{"action": "y"}}]}}
model = artifact.AgentModel(net, fz, bank, {{"bot": "market_data"}})
canary = [dict(bot=b, data_type=d, input=x, action=a) for b, d, x, a in rows[:4]]
path = artifact.save({str(tmp_path / "a")!r}, model, {{"model": net.cfg.to_dict()}}, canary, {{}})
loaded = artifact.load(path)
(made,) = decide(loaded, [Query.of("bot", "go", {{"rsi": 12.0}})])
answer = made.answer
assert answer["result"]["action"] in bank["bot"], answer
print(sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")))
"""
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
    assert "lightning" not in SERVING_REQUIREMENTS
    assert "lightning" not in _imports(ROOT / "serving" / "pyfunc.py")
    assert not {"lightning", "pytorch_lightning"} & _imports(ROOT / "model" / "artifact.py")

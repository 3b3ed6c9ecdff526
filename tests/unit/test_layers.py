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

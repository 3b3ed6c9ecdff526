"""The policy bench's summary over seeds (its learners are run by the bench itself)."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "policy_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("policy_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _seed(ours: float, lightgbm: float) -> dict:
    # behaviour 0.1 and oracle 0.5: a gap of 0.4
    return {
        "values": {
            "ours": ours,
            "LightGBM direct method": lightgbm,
            "behaviour (logged)": 0.1,
            "oracle": 0.5,
        }
    }


def test_over_seeds_each_learner_has_its_mean_its_worst_seed_and_its_worst_against_lightgbm():
    bench = _bench()
    rows = {r[0]: r[1:] for r in bench.summary([_seed(0.40, 0.38), _seed(0.30, 0.34)])}
    value, gap, worst, behind = rows["ours"]
    assert value == pytest.approx(0.35)
    assert gap == pytest.approx(0.625)  # (0.75 + 0.5) / 2
    assert worst == pytest.approx(0.5)
    assert behind == pytest.approx(-0.1)  # seed 2: 0.5 against LightGBM's 0.6
    assert rows["LightGBM direct method"][3] == 0.0


def test_variants_are_named_options_of_the_training():
    bench = _bench()
    args = bench.argparse.Namespace(
        members=[1, 3], variant=["wide=--lr 0.002 --members 2"], only_variants=False
    )
    assert bench._variants(args) == {
        "ours": [],
        "ours, 3 members": ["--members", "3"],
        "wide": ["--lr", "0.002", "--members", "2"],
    }


def test_ours_ranked_again_at_another_pessimism_uses_the_noise_saved_with_the_artifact(tmp_path):
    bench = _bench()
    bank = {"b": [{"action": "often"}, {"action": "rare"}]}
    saved = {"counts": {"b": [100, 4]}, "pessimism": 2.0, "noise_sd": 0.5}
    (tmp_path / "action_bank.json").write_text(bench.json.dumps({"bank": bank, "support": saved}))
    trained = bench.Support.from_json(saved, bank)
    assert trained.margin("b", {"action": "rare"}) == pytest.approx(0.5)  # 2 x 0.5 / 2

    assert bench.saved_noise(tmp_path) == 0.5
    again = bench.with_pessimism(trained, bench.saved_noise(tmp_path), 3.0)
    assert again.margin("b", {"action": "rare"}) == pytest.approx(0.75)
    assert again.margin("b", {"action": "often"}) == pytest.approx(0.15)
    assert bench.with_pessimism(trained, 0.5, 0.0).margin("b", {"action": "rare"}) == 0.0
    assert trained.margin("b", {"action": "rare"}) == pytest.approx(0.5)  # left as it was

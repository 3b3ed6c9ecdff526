import numpy as np

from core.settings import GateSpec
from flows.gate import decide, value_evidence
from flows.summary import render
from model.offpolicy import PolicyRows


def test_summary_has_every_section_and_the_links():
    ch = {
        "rmse": 0.26,
        "mae": 0.2,
        "auc": 0.8,
        "baseline_rmse": 0.38,
        "replay_value": 0.4,
        "rows": 2000,
    }
    rng = np.random.default_rng(0)
    reward = rng.normal(0.2, 0.3, 500)
    logged = [{"action": "a"}] * 250 + [{"action": "b"}] * 250
    new = PolicyRows.build(
        np.full(500, 0.3), np.full(500, 0.2), [{"action": "a"}] * 500, logged, 0.5, reward
    )
    old = PolicyRows.build(
        np.full(500, 0.25), np.full(500, 0.2), [{"action": "b"}] * 500, logged, 0.5, reward
    )
    value = value_evidence(GateSpec(), new, old, reward)
    gate = decide(
        GateSpec(), ch, np.full(500, 0.06), dict(ch, rmse=0.27), np.full(500, 0.07), "1", value
    ).to_dict()
    md = render(
        {
            "decision": "Completed: promoted v2",
            "snapshot": {
                "rows": 10000,
                "null_reward_rows": 0,
                "window": {"since": "a", "until": "b"},
                "watermark": "b",
                "layout": "app",
                "sha256": "f" * 64,
                "window_rows": 12000,
                "limit": 10000,
                "limit_cut": True,
                "trainable_rows": 9990,
                "quarantined": {"input: not JSON": 10},
            },
            "validation": "passed",
            "training": {"metrics": {"epochs": 12, "rmse": 0.26, "auc": 0.8}},
            "gate": gate,
            "registry": {
                "name": "valifi-agent",
                "version": "2",
                "run_id": "abc",
                "version_url": "http://m/#/models/valifi-agent/versions/2",
                "run_url": "http://m/#/experiments/1/runs/abc",
            },
        }
    )
    for part in (
        "# train: Completed: promoted v2",
        "## Snapshot",
        "10000",
        "f" * 64,
        "| rows in the window | 12000 (cut to the newest 10000 by VALIFI_EXPORT_LIMIT) |",
        "| trainable rows | 9990 |",
        "| payloads set aside | input: not JSON 10 (quarantine.parquet) |",
        "## Validation",
        "## Training",
        "## Gate",
        "| auc | 0.8000 | 0.8000 |",
        "95% CI",
        "**pass**",
        "margin +0.0070",
        "Rule: Promote when",
        "| policy value, doubly robust | ",
        "| effective sample size (matched rows) | 250 (250) | 250 (250) |",
        "| doubly-robust value, challenger − champion |",
        "(applied: no shown loss) |",
        "Off-policy value: the off-policy estimates are well conditioned; the paired interval",
        "[valifi-agent v2](http://m/#/models/valifi-agent/versions/2)",
        "(http://m/#/experiments/1/runs/abc)",
    ):
        assert part in md


def test_summary_of_a_failed_run_keeps_the_error():
    md = render({"decision": "Failed", "error": "3 of 14 expectations failed"})
    assert "# train: Failed" in md and "3 of 14 expectations failed" in md

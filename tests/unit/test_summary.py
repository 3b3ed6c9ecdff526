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


def test_summary_shows_the_rows_judged_apart_the_source_and_the_way_to_promote_anyway():
    from flows.pipeline import override_hint

    apart = {
        "rows": 146,
        "bots": {"platform_onboarding": 146},
        "new_actions": 0,
        "unranked": 3,
        "mse": 0.1482,
        "value": {"dr": 0.16, "dr_ci": [-0.31, 0.53]},
    }
    ch = {"rmse": 0.3, "mae": 0.2, "auc": 0.7, "baseline_rmse": 0.4, "rows": 600}
    gate = decide(GateSpec(), ch, np.full(454, 0.09), ch, np.full(454, 0.05), "1", None, apart)
    assert not gate.passed
    source = {"cluster": "system 77", "database": "prod", "schema": "public"}
    source |= {"table": "bot_training_data", "layout": "app"}
    md = render(
        {
            "decision": "Rejected",
            "snapshot": {
                "window": {"since": "a", "until": "b"},
                "source": source,
                "source_id": "ab12",
            },
            "gate": gate.to_dict() | {"champion_version": "1"},
            "override": override_hint(["3", "4"], {"champion_version": "1"}, "4"),
        }
    )
    for part in (
        "| source | prod.public.bot_training_data on system 77 (layout app; id `ab12`) |",
        "| rows judged by the challenger alone (bots the champion does not know: "
        "platform_onboarding 146; actions new to it: 0) | 146 | — |",
        "| MSE on those rows | 0.1482 | — |",
        "| policy value on those rows, doubly robust | 0.1600 [-0.3100, 0.5300] | — |",
        "| rows of bots neither model knows (left out) | 3 | — |",
        "146 holdout rows judged by the challenger alone (the champion does not know "
        "platform_onboarding (146)): MSE 0.1482, doubly-robust value +0.1600",
        "The gate has rejected 2 runs in a row against v1 (v3, v4). To promote v4 anyway "
        '(load-checked, audited): valifi promote 4 --reason "<why>"',
    ):
        assert part in md, part

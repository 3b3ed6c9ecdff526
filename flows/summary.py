"""The run summary: one markdown artifact per run of `train`."""

from __future__ import annotations


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "—" if v is None else str(v)


def _table(rows: list[tuple[str, object]]) -> list[str]:
    return ["| | |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in rows]]


def _gate(gate: dict) -> list[str]:
    """The gate table, the decision and the rule in words."""
    out: list[str] = []
    ch, champ = gate["challenger"], gate.get("champion") or {}
    out += [
        "## Gate",
        "| metric | challenger | "
        f"champion{' v' + gate['champion_version'] if gate.get('champion_version') else ''}"
        " |",
        "|---|---|---|",
    ]
    for k in ("rmse", "mae", "auc", "baseline_rmse", "replay_value", "rows"):
        out.append(f"| {k} | {_fmt(ch.get(k))} | {_fmt(champ.get(k))} |")
    if d := gate.get("mse_diff"):
        out.append(
            f"| holdout MSE, challenger − champion | {d['mean']:+.4f} | "
            f"95% CI [{d['low']:+.4f}, {d['high']:+.4f}]; margin {d['margin']:+.4f} |"
        )
    out += _value_rows(gate.get("value"))
    out += _apart_rows(gate.get("apart"))
    out += [
        "",
        "**" + ("pass" if gate["passed"] else "reject") + "**: " + "; ".join(gate["reasons"]),
        "",
    ]
    if (value := gate.get("value")) and value.get("note"):
        out += [f"Off-policy value: {value['note']}.", ""]
    out += _logged_lines((value or {}).get("propensities"), (value or {}).get("self_check"))
    if rule := gate.get("rule"):
        out += [f"Rule: {rule}", ""]
    return out


def _estimate(e: dict | None, key: str) -> str:
    if not e:
        return "—"
    low, high = e[f"{key}_ci"]
    return f"{e[key]:.4f} [{low:.4f}, {high:.4f}]"


def _value_rows(value: dict | None) -> list[str]:
    """Off-policy value of each model's decisions (95% bootstrap intervals)."""
    if not value or not value.get("challenger"):
        return []
    ch, champ = value["challenger"], value.get("champion")
    out = [
        f"| policy value, {name} | {_estimate(ch, key)} | {_estimate(champ, key)} |"
        for key, name in (("dm", "direct method"), ("snips", "SNIPS"), ("dr", "doubly robust"))
    ]
    out.append(
        f"| effective sample size (matched rows) | {ch['ess']:.0f} ({ch['matched']}) | "
        + (f"{champ['ess']:.0f} ({champ['matched']})" if champ else "—")
        + " |"
    )
    if d := value.get("diff"):
        applied = f"applied: {value.get('test')}" if value.get("checked") else "not applied"
        out.append(
            f"| doubly-robust value, challenger − champion | {d['mean']:+.4f} | "
            f"95% CI [{d['low']:+.4f}, {d['high']:+.4f}]; margin {-d['margin']:+.4f} "
            f"({applied}) |"
        )
    return out


def _apart_rows(apart: dict | None) -> list[str]:
    """The holdout rows judged by the challenger alone, in the gate table."""
    if not apart:
        return []
    bots = ", ".join(f"{b} {n}" for b, n in apart["bots"].items()) or "—"
    out = [
        f"| rows judged by the challenger alone (bots the champion does not know: {bots}; "
        f"actions new to it: {apart['new_actions']}) | {apart['rows']} | — |"
    ]
    if apart["rows"]:
        out.append(f"| MSE on those rows | {_fmt(apart['mse'])} | — |")
        out.append(
            f"| policy value on those rows, doubly robust | "
            f"{_estimate(apart.get('value'), 'dr')} | — |"
        )
    if apart.get("unranked"):
        out.append(f"| rows of bots neither model knows (left out) | {apart['unranked']} | — |")
    return out


def _logged_lines(sources: dict | None, check: dict | None) -> list[str]:
    """Which propensities the estimates used, and the self-check on logged decisions."""
    out = []
    if sources:
        out += [
            f"Propensities: {sources['logged']} holdout rows with the probability logged "
            f"when the decision was served, {sources['estimated']} estimated by the "
            "behaviour model.",
            "",
        ]
    if check:
        lo, hi = check["ci"]
        line = (
            f"Self-check: IPS of the champion on its own {check['rows']} logged decisions "
            f"{check['ips']:+.4f} [{lo:+.4f}, {hi:+.4f}], observed mean reward "
            f"{check['observed']:+.4f}: "
        )
        out += [line + ("agree." if check["agrees"] else f"**WARNING**: {check['warning']}."), ""]
    return out


def _decisions(d: dict | None) -> object:
    if not d or not d.get("logged"):
        return 0 if d is not None else None
    wait = f"{d['reward_wait_s'] / 3600:g} h"
    text = (
        f"{d['logged']} logged: {d['joined']} joined with a reward ({d['from_api']} by "
        f"POST /reward, {d['from_bot_rows']} by the bots' rows), {d['waiting']} waiting "
        f"for the {wait} reward wait, {d['without_reward']} without a reward"
    )
    if d.get("late_rewards"):
        text += f" ({d['late_rewards']} rewards came after the wait: not trained on)"
    if d.get("default_reward") is not None and d["without_reward"]:
        text += f", trained on with the default reward {d['default_reward']:g}"
    return text


def _source(snap: dict) -> object:
    src = snap.get("source")
    if not src:
        return snap.get("layout")
    return (
        f"{src['database']}.{src['schema']}.{src['table']} on {src['cluster']} "
        f"(layout {src['layout']}; id `{snap.get('source_id')}`)"
    )


def _window_rows(snap: dict) -> object:
    held = snap.get("window_rows")
    if held is None or not snap.get("limit_cut"):
        return held
    return f"{held} (cut to the newest {snap.get('limit')} by VALIFI_EXPORT_LIMIT)"


def _aside(quarantined: dict | None) -> object:
    if not quarantined:
        return 0 if quarantined is not None else None
    return "; ".join(f"{k} {v}" for k, v in quarantined.items()) + " (quarantine.parquet)"


TRAINING_FIGURES = (
    "train_rows",
    "epochs",
    "train_seconds",
    "val_loss",
    "rmse",
    "auc",
    "true_value_policy",
    "gap_closed",
)


def _snapshot_rows(snap: dict) -> list[tuple[str, object]]:
    return [
        ("rows", snap.get("rows")),
        ("rows in the window", _window_rows(snap)),
        ("unscored rows", snap.get("null_reward_rows")),
        ("trainable rows", snap.get("trainable_rows")),
        ("payloads set aside", _aside(snap.get("quarantined"))),
        ("window", f"{snap['window']['since']} → {snap['window']['until']}"),
        ("newest row", snap.get("watermark")),
        ("source", _source(snap)),
        ("served decisions", _decisions(snap.get("decisions"))),
        ("sha256", f"`{snap.get('sha256')}`"),
    ]


def render(s: dict) -> str:
    """Markdown for the Prefect UI from the pieces a run gathered (any may be missing)."""
    out = [f"# train: {s.get('decision', 'unknown')}", ""]
    if snap := s.get("snapshot"):
        out += ["## Snapshot", *_table(_snapshot_rows(snap)), ""]
    if (val := s.get("validation")) is not None:
        out += ["## Validation", val, ""]
    if train := s.get("training"):
        m = train.get("metrics", {})
        out += ["## Training", *_table([(k, m[k]) for k in TRAINING_FIGURES if k in m]), ""]
    if shadow := s.get("shadow"):
        out += ["## Shadow", shadow, ""]
    if gate := s.get("gate"):
        out += _gate(gate)
    if override := s.get("override"):
        out += [override, ""]
    if reg := s.get("registry"):
        out += [
            "## Registry",
            f"- model version: [{reg['name']} v{reg['version']}]({reg['version_url']})",
            f"- MLflow run: [{reg['run_id']}]({reg['run_url']})",
            "",
        ]
    if w := s.get("watch"):
        out += ["## After promotion", f"- {w}", ""]
    if err := s.get("error"):
        out += ["## Error", f"```\n{err}\n```", ""]
    return "\n".join(out)

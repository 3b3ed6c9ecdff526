"""The shadow report and the promotion through it.

The agent server scores the `Challenger` alias in shadow on live execute decisions
(serving.shadow) and logs its view of each one to `agent_shadow`. Production served
those decisions with known probabilities, so the Challenger's value on today's
traffic can be estimated without serving it: on the decisions that have a reward,
its IPS, SNIPS and doubly-robust values minus Production's, with paired bootstrap
intervals and the effective sample size (model.offpolicy.live_estimates). The
reward model of the DR terms is Production's own expected reward of each candidate
(the Challenger's, for a candidate Production did not rank).

`judge` turns the report into a verdict with the gate's numbers: `reject` when the
upper bound of the DR difference lies below -margin x the rewards' standard
deviation (shown worse: taking a Challenger off errs on the safe side, so no floor
on the evidence); `promote` when its lower bound lies above -margin with at least
`shadow_min_ess` decisions' worth of evidence (effective sample size); else `wait`,
with the reason.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from core.registry import AliasMoved, Registry
from core.settings import ALIAS, CHALLENGER, GateSpec
from model.features import canonical_json
from model.offpolicy import live_estimates

PROMOTE, REJECT, WAIT = "promote", "reject", "wait"


@dataclass
class Verdict:
    outcome: str  # promote, reject or wait
    reason: str


def since_set(registry: Registry, version: str) -> datetime | None:
    """When `Challenger` was last set to `version` (its audit record), if recorded."""
    moves = [r for r in registry.audit(alias=CHALLENGER) if r.get("to") == version]
    return datetime.fromisoformat(moves[-1]["when"]) if moves else None


def report(
    url: str,
    registry: Registry,
    spec: GateSpec,
    version: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict:
    """The shadow report of Challenger `version` (default: the one the alias holds)
    over [since, until) (default: since the alias was set to it, or the last
    `shadow_max_days`, until now), against the version Production holds now."""
    from core import decisions

    if version is None:
        current = registry.challenger()
        if current is None:
            raise LookupError(f"no {CHALLENGER} is set: nothing is scored in shadow")
        version = current.version
    until = until or datetime.now(UTC)
    since = since or since_set(registry, version) or until - timedelta(days=spec.shadow_max_days)
    champion = registry.champion()
    production = champion.version if champion else None
    conn = decisions.connect(url, decisions.SHADOW)
    try:
        rows = decisions.shadow_window(conn, version, since, until)
        baseline = decisions.unshadowed_times(conn, version, since, until)
    finally:
        conn.close()
    out = summarise(rows, spec, production)
    out |= {"version": version, "production": production}
    out["since"] = since.isoformat(timespec="seconds")
    out["until"] = until.isoformat(timespec="seconds")
    out["cost"]["decide_ms_unshadowed"] = _percentiles(baseline)
    return out


def summarise(rows: list[dict], spec: GateSpec, production: str | None) -> dict:
    """The report's figures from the shadow's rows (core.decisions.shadow_window)."""
    counts = {k: 0 for k in ("scored", "skipped", "error", "missing")}
    reasons: dict[str, int] = {}
    for r in rows:
        n = r.get("decisions") or 1  # a row of skipped decisions stands for several
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + n
        if r["reason"]:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + n
    scored = [r for r in rows if r["outcome"] == "scored"]
    per_bot: dict[str, list[bool]] = {}
    for r in scored:
        per_bot.setdefault(r["bot"], []).append(bool(r["agrees"]))
    agreement = {b: float(np.mean(v)) for b, v in sorted(per_bot.items())}
    evidence = [
        r
        for r in scored
        if r["reward"] is not None
        and r["probability"] is not None
        and (production is None or r["production_version"] == production)
    ]
    value = live_estimates(
        *_pieces(evidence),
        n_boot=spec.ope_bootstrap,
        alpha=1 - spec.confidence,
        min_ess=spec.shadow_min_ess,
    )
    return {
        "rows": len(rows),
        "decisions": sum(counts.values()),
        "counts": counts,
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:5]),
        "agreement": float(np.mean([a for v in per_bot.values() for a in v])) if scored else None,
        "agreement_by_bot": agreement,
        "with_reward": len(evidence),
        "value": value,
        "cost": {
            "scoring_ms": _percentiles([r["scoring_ms"] for r in scored]),
            "decide_ms_shadowed": _percentiles([r["decide_ms"] for r in scored]),
        },
    }


def _pieces(rows: list[dict]) -> tuple[list, ...]:
    """Per decision: reward, Production's probability of the served action, the
    Challenger's, the reward model's value of it, and each policy's expected value
    under the reward model (Production's expected rewards; the Challenger's own for a
    candidate Production did not rank)."""
    out: tuple[list, ...] = ([], [], [], [], [], [])
    for r in rows:
        served = json.loads(r["ranking"])
        q = {canonical_json(c["action"]): c["expected_reward"] for c in served}
        mine = json.loads(r["shadow_ranking"])
        key = canonical_json(json.loads(r["action"]))
        values = (
            r["reward"],
            r["probability"],
            r["logged_probability"],
            q[key],
            sum(
                c["probability"] * q.get(canonical_json(c["action"]), c["expected_reward"])
                for c in mine
            ),
            sum(c["probability"] * c["expected_reward"] for c in served),
        )
        for column, v in zip(out, values, strict=True):
            column.append(float(v))
    return out


def _percentiles(values) -> dict:
    v = np.asarray([x for x in values if x is not None], float)
    if not len(v):
        return {"n": 0, "p50": None, "p99": None}
    return {"n": len(v), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99))}


def judge(rep: dict, spec: GateSpec) -> Verdict:
    """Whether the live evidence shows the Challenger non-inferior by the gate's margin."""
    v = rep["value"]
    if not rep["with_reward"]:
        return Verdict(WAIT, "no decision scored in shadow has a reward yet")
    dr = v["dr"]
    margin = spec.margin * v["reward_std"]
    low, high = dr["ci"]
    text = (
        f"doubly-robust value on {rep['with_reward']} live decisions, Challenger v{rep['version']} "
        f"− Production v{rep['production']}: {dr['diff']:+.4f}, {spec.confidence:.0%} CI "
        f"[{low:+.4f}, {high:+.4f}], effective sample size {v['ess']:.0f}"
    )
    bound = f"the margin {-margin:+.4f}"
    if high < -margin:  # taking it off errs on the safe side: no evidence floor
        return Verdict(REJECT, f"{text}: worse (upper bound below {bound})")
    if v["ess"] < spec.shadow_min_ess:
        need = f"an effective sample size of {spec.shadow_min_ess:g} is needed to promote"
        return Verdict(WAIT, f"{text}: too little evidence ({need})")
    if low > -margin:
        return Verdict(PROMOTE, f"{text}: non-inferior (lower bound above {bound})")
    return Verdict(WAIT, f"{text}: not shown non-inferior yet (lower bound not above {bound})")


def render(rep: dict, verdict: Verdict | None = None) -> str:
    """The report in plain text (markdown), for the command and the run summary."""
    c, v = rep["counts"], rep["value"]
    lines = [
        f"Challenger v{rep['version']} in shadow beside {ALIAS} v{rep['production']}, "
        f"{rep['since']} .. {rep['until']}",
        "",
        f"- decisions taken up: {rep['decisions']}: {c['scored']} scored, {c['skipped']} skipped, "
        f"{c['error']} errors, {c['missing']} missing",
    ]
    lines += [f"  - {n} × {why}" for why, n in rep["reasons"].items()]
    if rep["agreement"] is not None:
        by_bot = ", ".join(f"{b} {a:.0%}" for b, a in rep["agreement_by_bot"].items())
        lines.append(f"- first choice the same as {ALIAS}'s: {rep['agreement']:.1%} ({by_bot})")
    lines.append(f"- scored decisions with a reward: {rep['with_reward']}")
    if rep["with_reward"]:
        lines += [
            "",
            f"| estimate | Challenger | {ALIAS} | difference [95% CI] |",
            "|---|---|---|---|",
        ]
        for key, name in (("ips", "IPS"), ("snips", "SNIPS"), ("dr", "doubly robust")):
            e = v[key]
            lines.append(
                f"| {name} | {e['challenger']:+.4f} | {e['production']:+.4f} | "
                f"{e['diff']:+.4f} [{e['ci'][0]:+.4f}, {e['ci'][1]:+.4f}] |"
            )
        lines.append(f"| effective sample size | {v['ess']:.0f} of {v['rows']} | | |")
        if v.get("warning"):
            lines.append(f"\n{v['warning']}")
    cost = rep["cost"]
    lines += [
        "",
        "- cost: the Challenger's scoring per decision (after the answer left) "
        f"{_ms(cost['scoring_ms'])}; {ALIAS}'s decision time per request with a shadow "
        f"{_ms(cost['decide_ms_shadowed'])}, without {_ms(cost.get('decide_ms_unshadowed'))}",
    ]
    if verdict is not None:
        lines += ["", f"**{verdict.outcome}**: {verdict.reason}"]
    return "\n".join(lines)


def _ms(p: dict | None) -> str:
    if not p or not p["n"]:
        return "n/a"
    return f"p50 {p['p50']:.2f} ms, p99 {p['p99']:.2f} ms (n={p['n']})"


def promote_from_shadow(
    url: str, registry: Registry, spec: GateSpec, by: str, move_id: str | None = None
) -> tuple[Verdict, dict, dict | None]:
    """Judge the Challenger on its live evidence; when it is shown non-inferior, move
    Production to it (load-checked, check-then-move, audited) and remove the
    Challenger alias. Returns the verdict, the report and the Production move (None
    when nothing moved)."""
    rep = report(url, registry, spec)
    verdict = judge(rep, spec)
    if verdict.outcome != PROMOTE:
        return verdict, rep, None
    version = rep["version"]
    move = registry.promote(
        version,
        f"promoted from the shadow: {verdict.reason}",
        by,
        expected=rep["production"],
        move_id=f"{move_id}:production" if move_id else None,
    )
    _take_off(registry, version, f"v{version} promoted to {ALIAS}", by, move_id, "clear")
    return verdict, rep, move


def _take_off(registry: Registry, version: str, why: str, by: str, move_id, step: str):
    """Remove the Challenger alias if it still holds `version` (audited); None when
    someone set another Challenger meanwhile (theirs stays)."""
    with contextlib.suppress(AliasMoved):
        return registry.clear(
            CHALLENGER,
            why,
            by,
            expected=version,
            move_id=f"{move_id}:{step}" if move_id else None,
        )
    return None


def settle(
    url: str, registry: Registry, spec: GateSpec, by: str, move_id: str | None = None
) -> dict | None:
    """What a train run does with the Challenger before it trains: promote it when its
    live evidence shows it non-inferior; take it off the alias when the evidence shows
    it worse, or when it has waited `shadow_max_days`; else leave it scoring. None when
    no Challenger is set. Returns the report, the verdict and what moved, and the
    report in markdown (`text`)."""
    if registry.challenger() is None:
        return None
    verdict, rep, move = promote_from_shadow(url, registry, spec, by, move_id)
    cleared = None
    age = datetime.now(UTC) - datetime.fromisoformat(rep["since"])
    if verdict.outcome == WAIT and age > timedelta(days=spec.shadow_max_days):
        verdict = Verdict(
            REJECT,
            f"{verdict.reason}; not shown non-inferior within {spec.shadow_max_days:g} days",
        )
    if verdict.outcome == REJECT:
        why = f"taken off the shadow: {verdict.reason}"
        cleared = _take_off(registry, rep["version"], why, by, move_id, "reject")
    return {
        "version": rep["version"],
        "verdict": verdict.outcome,
        "reason": verdict.reason,
        "promoted": move is not None,
        "cleared": cleared is not None,
        "report": rep,
        "text": render(rep, verdict),
    }

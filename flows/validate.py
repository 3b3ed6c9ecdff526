"""Validate a snapshot with a Great Expectations suite before anything trains on it.

The suite checks what training relies on: the columns and their types, bot and
data type present, rewards inside their bounds, data types from the allowed set,
timestamps inside the export window, unique ids, few unscored rows and few
unparseable payloads (inputs and actions), and enough rows. Beyond the suite, the
share of rows of each bot and each data type is compared with the reference: the
newest earlier snapshot beside this one, of the same source (cluster, database,
table, layout), that passed or whose new mix an operator accepted. A share that moved
more than `max_share_change` fails; the first snapshot of a source is judged on the
other expectations alone. The Data Docs HTML is written beside the snapshot
(`SNAPSHOT/validation/`), with a `validation.json` summary.

A real change (a bot went live or was retired) is accepted once, with a reason:
`accept()` (the command `valifi validate SNAPSHOT --accept --reason ...`) records who,
when and why in `SNAPSHOT/acceptance.json`, and that snapshot becomes the reference
of the next run. Only share failures can be accepted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

from core.settings import ExportSpec, ValidationSpec
from model.snapshot import ACCEPTANCE, DATA, DOCS, SCHEMA, VALIDATION, Manifest


@dataclass
class Failure:
    expectation: str
    column: str | None
    observed: object
    details: str
    acceptable: bool = False  # a change in the mix that an operator may accept as real

    def line(self) -> str:
        where = f" on {self.column}" if self.column else ""
        return f"{self.expectation}{where}: observed {self.observed} ({self.details})"


@dataclass
class ValidationResult:
    success: bool
    evaluated: int
    failures: list[Failure]
    docs: str | None
    reference: str | None = None  # the earlier snapshot the shares were compared with
    snapshot: str | None = None
    # the reference's acceptance record, when an operator accepted its mix
    reference_acceptance: dict | None = None
    source_id: str | None = None

    @property
    def acceptable(self) -> bool:
        """Failed on the shares alone: an operator may accept the new mix."""
        return bool(self.failures) and all(f.acceptable for f in self.failures)

    def reason(self) -> str:
        lines = [f"{len(self.failures)} of {self.evaluated} expectations failed:"]
        lines += [f"- {f.line()}" for f in self.failures]
        if self.acceptable:
            lines.append(accept_hint(self.snapshot or "SNAPSHOT"))
        return "\n".join(lines)

    def compared(self) -> str:
        """How the shares were judged, in a phrase."""
        if self.reference is None:
            return "first snapshot of this source: shares not compared"
        text = f"shares compared with {self.reference}"
        if a := self.reference_acceptance:
            text += f" (its new mix accepted by {a['by']} at {a['at']}: {a['reason']})"
        return text


def accept_hint(snapshot: str) -> str:
    return (
        "If this change is real (a bot went live or was retired), accept it and the next "
        f"run compares with this snapshot: valifi validate {snapshot} --accept "
        '--reason "<why>"'
    )


class ValidationFailed(RuntimeError):
    def __init__(self, result: ValidationResult, note: str = ""):
        super().__init__(result.reason() + (f"\n{note}" if note else ""))
        self.result = result


class AcceptError(ValueError):
    """The snapshot's validation cannot be accepted; the message says why."""


def _suite(spec: ValidationSpec, window: dict[str, str], min_rows: int):
    import great_expectations.expectations as gxe

    since = pd.Timestamp(window["since"])
    until = pd.Timestamp(window["until"])
    bad_mostly = 1.0 - spec.max_bad_payload_fraction
    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=SCHEMA.names, exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=min_rows),
        *[
            gxe.ExpectColumnValuesToNotBeNull(column=c)
            for c in ("id", "bot", "data_type", "input", "created_at")
        ],
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValuesToBeInTypeList(column="reward", type_list=["float64", "Float64"]),
        # (created_at's type is checked by the window expectation: it compares timestamps)
        gxe.ExpectColumnValuesToBeBetween(
            column="reward", min_value=spec.reward_min, max_value=spec.reward_max
        ),
        gxe.ExpectColumnValuesToBeInSet(column="data_type", value_set=spec.data_types),
        gxe.ExpectColumnValuesToBeBetween(column="created_at", min_value=since, max_value=until),
        gxe.ExpectColumnValuesToNotBeNull(
            column="reward", mostly=1.0 - spec.max_null_reward_fraction
        ),
        gxe.ExpectColumnValuesToBeInSet(column="input_ok", value_set=[True], mostly=bad_mostly),
        gxe.ExpectColumnValuesToBeInSet(column="action_ok", value_set=[True], mostly=bad_mostly),
    ]


def acceptance(snapshot: Path) -> dict | None:
    """The operator's acceptance of a snapshot's new mix, if recorded."""
    try:
        return json.loads((Path(snapshot) / ACCEPTANCE).read_text())
    except (OSError, ValueError):
        return None


def reference_snapshot(snapshot: Path) -> Path | None:
    """The newest snapshot beside this one, of the same source and exported before it,
    whose validation passed or whose mix was accepted."""
    me = Manifest.read(snapshot)
    if not me.source_id:
        return None
    found: list[tuple[str, Path]] = []
    for p in snapshot.parent.iterdir():
        if p == snapshot or p.name.startswith(".") or not p.is_dir():
            continue
        try:
            passed = json.loads((p / VALIDATION).read_text()).get("success")
            m = Manifest.read(p)
        except (OSError, ValueError, TypeError):
            continue
        good = passed or acceptance(p) is not None
        if good and m.source_id == me.source_id and m.exported_at < me.exported_at:
            found.append((m.exported_at, p))
    return max(found)[1] if found else None


def accept(snapshot: Path, reason: str, by: str) -> dict:
    """Record that the change in shares that failed `snapshot`'s validation is real;
    the snapshot then serves as the next run's reference. Returns the record."""
    snapshot = Path(snapshot)
    if not reason.strip():
        raise AcceptError("say why the new mix is real: --reason is required")
    try:
        summary = json.loads((snapshot / VALIDATION).read_text())
    except (OSError, ValueError):
        raise AcceptError(
            f"{snapshot} has no validation result: validate it first (valifi validate {snapshot})"
        ) from None
    if summary.get("success"):
        raise AcceptError(f"{snapshot} passed validation: there is nothing to accept")
    failures = [Failure(**f) for f in summary.get("failures", [])]
    if other := [f for f in failures if not f.acceptable]:
        raise AcceptError(
            "only a change in the shares of bots or data types can be accepted; these "
            "expectations failed as well: " + "; ".join(f.line() for f in other)
        )
    record = {
        "by": by,
        "at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "reason": reason.strip(),
        "accepted": [f.line() for f in failures],
        "sha256": Manifest.read(snapshot).sha256,
    }
    _write_atomic(snapshot / ACCEPTANCE, json.dumps(record, indent=2))
    return record


def share_failures(now: Manifest, before: Manifest, limit: float, ref: str) -> list[Failure]:
    """One failure per column (bot, data type) whose share of rows moved most, when
    that move exceeds `limit`; rows without a value count as their own group."""
    failures = []
    for column, key, nulls in (
        ("bot", "bots", "null_bot_rows"),
        ("data_type", "data_types", "null_data_type_rows"),
    ):
        counts = [getattr(m, key) | {None: getattr(m, nulls)} for m in (now, before)]
        totals = [sum(c.values()) or 1 for c in counts]
        shares = {
            k: tuple(c.get(k, 0) / t for c, t in zip(counts, totals, strict=True))
            for k in counts[0].keys() | counts[1].keys()
        }
        worst = max(shares, key=lambda k: (abs(shares[k][0] - shares[k][1]), str(k)))
        share, was = shares[worst]
        if abs(share - was) > limit:
            name = "no value" if worst is None else repr(worst)
            failures.append(
                Failure(
                    f"share of each {column.replace('_', ' ')}",
                    column,
                    f"{name} {was:.1%} -> {share:.1%}",
                    f"max_share_change={limit:g} against {ref}",
                    acceptable=True,
                )
            )
    return failures


def _observed(res) -> object:
    r = res.result or {}
    for key in ("observed_value", "unexpected_percent", "unexpected_count"):
        if r.get(key) is not None:
            value = r[key]
            if key == "unexpected_percent":
                return f"{value:.2f}% unexpected"
            return value
    if r.get("details"):
        return r["details"]
    return r


def _failure(res) -> Failure:
    cfg = res.expectation_config
    kwargs = dict(cfg.kwargs)
    column = kwargs.pop("column", None)
    kwargs.pop("batch_id", None)
    r = res.result or {}
    sample = r.get("partial_unexpected_list")
    details = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    if sample:
        details += f"; e.g. {sample[:3]}"
    return Failure(cfg.type, column, _observed(res), details)


def validate_snapshot(
    snapshot: Path, spec: ValidationSpec | None = None, min_rows: int | None = None
) -> ValidationResult:
    """Run the suite on a snapshot, write its Data Docs and summary beside it; the
    row-count floor is the export's `min_rows` unless given."""
    import great_expectations as gx

    spec = spec or ValidationSpec()
    min_rows = ExportSpec().min_rows if min_rows is None else min_rows
    snapshot = Path(snapshot)
    manifest = Manifest.read(snapshot)
    df = pd.read_parquet(snapshot / DATA)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}
    source = ctx.data_sources.add_pandas("snapshot")
    asset = source.add_dataframe_asset("bot_training_data")
    batch_def = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name="bot_training_data"))
    for exp in _suite(spec, manifest.window, min_rows):
        suite.add_expectation(exp)
    vd = ctx.validation_definitions.add(
        gx.ValidationDefinition(name="snapshot", data=batch_def, suite=suite)
    )
    results = vd.run(batch_parameters={"dataframe": df})
    failures = [_failure(r) for r in results.results if not r.success]
    evaluated = len(results.results)
    reference = reference_snapshot(snapshot)
    if reference is not None:
        failures += share_failures(
            manifest, Manifest.read(reference), spec.max_share_change, reference.name
        )
        evaluated += 2
    docs = _build_docs(ctx, snapshot)
    result = ValidationResult(
        success=not failures,
        evaluated=evaluated,
        failures=failures,
        docs=docs,
        reference=None if reference is None else reference.name,
        snapshot=str(snapshot),
        reference_acceptance=None if reference is None else acceptance(reference),
        source_id=manifest.source_id,
    )
    summary = asdict(result) | {"validated_at": datetime.now().astimezone().isoformat()}
    _write_atomic(snapshot / VALIDATION, json.dumps(summary, indent=2, default=str))
    return result


def _build_docs(ctx, snapshot: Path) -> str | None:
    """Data Docs into SNAPSHOT/validation/, built aside and renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-docs-", dir=snapshot))
    try:
        ctx.add_data_docs_site(
            site_name="snapshot",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(tmp),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        ctx.build_data_docs(site_names=["snapshot"])
        final = snapshot / DOCS
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        return str(final / "index.html")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

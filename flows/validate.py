"""Validate a snapshot with a Great Expectations suite before anything trains on it.

The suite checks what training relies on: the columns and their types, bot and
data type present, rewards inside their bounds, data types from the allowed set,
timestamps inside the export window, unique ids, few unscored rows and few
unparseable payloads (inputs and actions), and enough rows. Beyond the suite, the
share of rows of each bot and each data type is compared with the previous snapshot
beside this one that passed: a share that moved more than `max_share_change` fails.
The Data Docs HTML is written beside the snapshot (`SNAPSHOT/validation/`), with a
`validation.json` summary.
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
from flows.export import DATA, Manifest

REPORT = "validation"
SUMMARY = "validation.json"
EXPECTED_COLUMNS = [
    "id",
    "bot_id",
    "bot",
    "data_type",
    "input",
    "input_ok",
    "action",
    "action_ok",
    "reward",
    "created_at",
]


@dataclass
class Failure:
    expectation: str
    column: str | None
    observed: object
    details: str

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

    def reason(self) -> str:
        lines = [f"{len(self.failures)} of {self.evaluated} expectations failed:"]
        return "\n".join(lines + [f"- {f.line()}" for f in self.failures])


class ValidationFailed(RuntimeError):
    def __init__(self, result: ValidationResult):
        super().__init__(result.reason())
        self.result = result


def _suite(spec: ValidationSpec, window: dict[str, str], min_rows: int):
    import great_expectations.expectations as gxe

    since = pd.Timestamp(window["since"])
    until = pd.Timestamp(window["until"])
    bad_mostly = 1.0 - spec.max_bad_payload_fraction
    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=EXPECTED_COLUMNS, exact_match=True),
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


def previous_passed(snapshot: Path) -> Path | None:
    """The newest snapshot beside this one, exported before it, whose validation passed."""
    before = Manifest.read(snapshot).exported_at
    found: list[tuple[str, Path]] = []
    for p in snapshot.parent.iterdir():
        if p == snapshot or p.name.startswith(".") or not p.is_dir():
            continue
        try:
            passed = json.loads((p / SUMMARY).read_text()).get("success")
            exported = Manifest.read(p).exported_at
        except (OSError, ValueError, TypeError):
            continue
        if passed and exported < before:
            found.append((exported, p))
    return max(found)[1] if found else None


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
    reference = previous_passed(snapshot)
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
    )
    summary = asdict(result) | {"validated_at": datetime.now().astimezone().isoformat()}
    _write_atomic(snapshot / SUMMARY, json.dumps(summary, indent=2, default=str))
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
        final = snapshot / REPORT
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

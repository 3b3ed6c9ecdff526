"""The registry layer against a real MLflow tracking server: idempotent registration,
check-then-move, truthful audit records under retries, and where rollback goes."""

from __future__ import annotations

import json

import pytest

from tests.helpers import train_small, valifi

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "valifi-agent-registry-tests"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from model.result import TrainResult

    snap, out = train_small(tmp_path_factory.mktemp("registry"), seed=5, rows=1200, epochs=1)
    return snap, TrainResult.read(out)


@pytest.fixture(scope="module")
def reg(stack_env):
    from core.registry import Registry

    return Registry(stack_env["MLFLOW_TRACKING_URI"], MODEL)


def _register(reg, trained, key: str) -> str:
    snap, result = trained
    return reg.register(result, snap, {"passed": True}, {"gate_decision": "pass"}, key).version


def _runs_with(reg, key: str) -> list:
    from core.registry import EXPERIMENT, RUN_KEY_TAG

    exp = reg.client.get_experiment_by_name(EXPERIMENT)
    return reg.client.search_runs([exp.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'")


def test_register_retried_finds_the_version_it_already_created(reg, trained):
    first = _register(reg, trained, "attempt-a")
    again = _register(reg, trained, "attempt-a")
    assert first == again
    assert [v.version for v in reg.versions()].count(first) == 1
    assert len(_runs_with(reg, "attempt-a")) == 1
    assert _register(reg, trained, "attempt-b") == str(int(first) + 1)


def test_register_after_an_attempt_that_logged_but_did_not_register(reg, trained):
    snap, result = trained
    count = len(reg.versions())
    run_id, _ = reg._log(result, snap, {"passed": True}, "attempt-c")  # then it died
    version = _register(reg, trained, "attempt-c")
    assert len(reg.versions()) == count + 1
    assert reg.version(version).run_id == run_id  # the logged run, not a second one
    assert len(_runs_with(reg, "attempt-c")) == 1


def _versions(reg, trained, n: int) -> list[str]:
    have = [v.version for v in reg.versions()]
    while len(have) < n:
        have.append(_register(reg, trained, f"extra-{len(have)}"))
    return have


def test_a_move_is_refused_when_production_is_not_what_the_caller_expects(reg, trained):
    from core.registry import AliasMoved

    v = _versions(reg, trained, 3)
    reg.move(v[0], reg.champion() and reg.champion().version, "start", "test", "promote")
    records = len(reg.audit(include_pending=True))
    with pytest.raises(AliasMoved, match=f"Production holds v{v[0]}, not v{v[1]}"):
        reg.move(v[2], v[1], "stale caller", "test", "promote")
    assert reg.champion().version == v[0]
    assert len(reg.audit(include_pending=True)) == records  # nothing recorded either


class FailOnce:
    """Let one registry write fail the way a network error would, once."""

    def __init__(self, fn, when):
        self.fn, self.when, self.failed = fn, when, False

    def __call__(self, *args):
        if not self.failed and self.when(*args):
            self.failed = True
            raise ConnectionError("connection reset while writing")
        return self.fn(*args)


@pytest.mark.parametrize("failing", ["audit done", "alias", "version tag"])
def test_a_move_retried_after_a_failed_write_records_a_truthful_from(
    reg, trained, monkeypatch, failing
):
    v = _versions(reg, trained, 3)
    start = reg.champion().version
    to = next(x for x in v if x != start)
    c = reg.client
    if failing == "audit done":
        fail = FailOnce(c.set_registered_model_tag, lambda n, k, body: '"done"' in body)
        monkeypatch.setattr(c, "set_registered_model_tag", fail)
    elif failing == "alias":
        fail = FailOnce(c.set_registered_model_alias, lambda *a: True)
        monkeypatch.setattr(c, "set_registered_model_alias", fail)
    else:
        fail = FailOnce(c.set_model_version_tag, lambda *a: True)
        monkeypatch.setattr(c, "set_model_version_tag", fail)
    move_id = f"retry-{failing}"
    with pytest.raises(ConnectionError):
        reg.move(to, start, "first try", "test", "promote", move_id)
    record = reg.move(to, start, "first try", "test", "promote", move_id)  # the retry
    assert fail.failed and reg.champion().version == to
    assert (record["from"], record["to"], record["state"]) == (start, to, "done")
    mine = [r for r in reg.audit(include_pending=True) if r.get("id") == move_id]
    assert len(mine) == 1 and mine[0]["from"] == start and mine[0]["to"] == to
    tag = json.loads(c.get_model_version(MODEL, to).tags["production.last_move"])
    assert tag["from"] == start and tag["id"] == move_id


def test_rollback_after_an_automatic_rollback_goes_to_the_last_good_version(
    reg, trained, stack_env
):
    v5, v6, v7 = _versions(reg, trained, 3)[-3:]
    cur = reg.champion().version
    reg.move(v5, cur, "good one", "test", "promote")
    reg.move(v6, v5, "nightly", "prefect:test", "promote")
    reg.move(v7, v6, "nightly", "prefect:test", "promote")
    reg.move(v6, v7, "automatic rollback of v7: error rate", "prefect:test", "rollback")
    assert reg.rollback_target() == v5  # never v7, which was rolled back from
    r = valifi("rollback", "--reason", "v6 is slow too", env={"VALIFI_MODEL_NAME": MODEL})
    assert r.returncode == 0, r.stderr
    assert f"v{v6} -> v{v5}" in r.stdout and reg.champion().version == v5
    last = reg.audit()[-1]
    assert (last["action"], last["from"], last["to"]) == ("rollback", v6, v5)
    # from v5 the only earlier holders were rolled back from (v6, v7) or are v5 itself
    assert reg.rollback_target() not in (v6, v7, v5)


def test_challenger_moves_are_audited_apart_and_never_move_production(reg, trained):
    from core.registry import AliasMoved
    from core.settings import CHALLENGER

    a, b = _versions(reg, trained, 2)[-2:]
    production = reg.champion()
    before = reg.audit()
    target = reg.rollback_target()
    reg.move(a, None, "shadow it", "test", "shadow", alias=CHALLENGER)
    with pytest.raises(AliasMoved, match=f"Challenger holds v{a}, not no version"):
        reg.move(b, None, "too late", "test", "shadow", alias=CHALLENGER)
    reg.move(b, a, "the newer one", "test", "shadow", alias=CHALLENGER)
    assert reg.challenger().version == b and reg.champion() == production
    cleared = reg.clear(CHALLENGER, "done", "test")
    assert cleared["to"] is None and reg.challenger() is None
    assert reg.clear(CHALLENGER, "again", "test") is None  # nothing to remove
    moves = reg.audit(alias=CHALLENGER)[-3:]
    assert [(m["action"], m["from"], m["to"]) for m in moves] == [
        ("shadow", None, a),
        ("shadow", a, b),
        ("clear", b, None),
    ]
    assert all(m["alias"] == CHALLENGER for m in moves)
    # Production's trail and where a rollback goes are as they were
    assert reg.audit() == before and reg.rollback_target() == target

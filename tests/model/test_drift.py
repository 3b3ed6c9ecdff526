"""After the reward rule drifts, the next nightly retrain recovers value and is promoted."""

from __future__ import annotations

import pytest

from tests.helpers import drift_recovery

pytestmark = pytest.mark.slow


def test_the_retrain_after_drift_recovers_at_least_half_the_lost_value(tmp_path):
    r = drift_recovery(tmp_path)
    print({k: v for k, v in r.items() if k != "decision"}, r["decision"].summary())
    assert r["lost"] > 0.02  # the drift really hurt the champion
    assert r["recovered"] >= 0.5
    assert r["decision"].passed, r["decision"].summary()
    assert r["decision"].value["diff"]["mean"] > 0  # the gate saw the value gained

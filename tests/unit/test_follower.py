"""The alias follower's failure handling, with stand-in resolve/fetch callables."""

import json
import os
import time

import pytest

from core.registry import Version
from serving.follower import AliasFollower


class Source:
    """Where the alias points, and what fetching a version does."""

    def __init__(self, target: Version, fetch):
        self.target, self._fetch, self.fetches = target, fetch, []

    def resolve(self):
        return self.target

    def fetch(self, version):
        self.fetches.append(version)
        return self._fetch(version)


def test_a_failed_download_is_retried_on_later_polls_with_backoff(tmp_path):
    def flaky(version):
        raise ConnectionError("registry went away mid-download")

    src = Source(Version("3", "run-a"), flaky)
    w = AliasFollower(src.resolve, src.fetch, poll_s=0.05, status_file=tmp_path / "w.json")
    w.sync_once()
    assert w.status.last_outcome["outcome"] == "retrying"
    assert "download failed: ConnectionError" in w.status.last_outcome["reason"]
    w.sync_once()  # within the backoff: no new attempt
    assert len(src.fetches) == 1
    time.sleep(0.06)
    w.sync_once()  # after it: tried again
    assert len(src.fetches) == 2
    status = json.loads((tmp_path / "w.json").read_text())
    assert status["worker"] == os.getpid() and status["version"] is None
    assert status["last_outcome"]["outcome"] == "retrying" and status["alias_version"] == "3"


def test_the_registry_returning_ends_the_backoff():
    """A download broke off as the registry went down; when it answers again the
    version is fetched at the next poll, whatever the backoff had grown to."""
    src = Source(Version("3", "run-a"), lambda v: (_ for _ in ()).throw(OSError("reset")))
    w = AliasFollower(src.resolve, src.fetch, poll_s=60)
    for _ in range(3):  # three failed downloads: the backoff is now 4 polls long
        w._retry_at = 0.0
        w.sync_once()
    assert w._retry_at > time.monotonic() + 100
    down = src.resolve
    src.resolve = lambda: (_ for _ in ()).throw(ConnectionError("registry down"))
    w.resolve = src.resolve
    w.sync_once()
    assert w.status.registry_reachable is False and len(src.fetches) == 3
    w.resolve = down  # back
    w.sync_once()
    assert w.status.registry_reachable is True and len(src.fetches) == 4


def test_a_verified_bad_version_is_refused_until_the_alias_moves(tmp_path):
    def junk(version):  # downloads fine, but is no loadable artifact
        folder = tmp_path / version.cache_key
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"not weights")
        return folder

    src = Source(Version("3", "run-a"), junk)
    w = AliasFollower(src.resolve, src.fetch, poll_s=0.01)
    w.sync_once()
    time.sleep(0.02)
    w.sync_once()
    assert len(src.fetches) == 1 and w.status.last_outcome["outcome"] == "failed"
    assert w.served is None and w.status.failures == 1
    # a registry reset: "v3" again, but another run: a different model, tried afresh
    src.target = Version("3", "run-b")
    w.sync_once()
    assert [v.run_id for v in src.fetches] == ["run-a", "run-b"]


class Loaded:
    """Stands in for a model loaded from `folder` and checked."""

    def __init__(self, folder):
        self.folder = folder

    def to(self, device):
        return self


@pytest.fixture
def loads(monkeypatch):
    """Every artifact loads (as a stand-in)."""
    monkeypatch.setattr("serving.follower.load", lambda folder, verify: Loaded(folder))


def test_moving_the_alias_back_swaps_at_once_without_a_reload(tmp_path, loads):
    src = Source(Version("1", "run-1"), lambda v: tmp_path / v.cache_key)
    w = AliasFollower(src.resolve, src.fetch, poll_s=60)
    w.sync_once()
    first = w.served.model
    src.target = Version("2", "run-2")
    w.sync_once()
    assert w.served.version == "2" and len(src.fetches) == 2
    src.target = Version("1", "run-1")  # rollback
    w.sync_once()
    assert w.served.version == "1" and w.served.model is first
    assert len(src.fetches) == 2  # nothing fetched or loaded again
    assert w.status.last_outcome["reason"] == "from v2"
    src.target = Version("1", "run-other")  # same number, another model: loaded afresh
    w.sync_once()
    assert len(src.fetches) == 3 and w.served.model is not first


def test_versions_are_cached_by_version_and_run():
    assert Version("1", "abc").cache_key != Version("1", "def").cache_key
    assert Version("1", "abc", "models:/x") == Version("1", "abc", "")  # source is no identity


def test_the_challengers_follower_drops_its_model_when_the_alias_is_removed(tmp_path, loads):
    src = Source(Version("4", "run-4"), lambda v: tmp_path / v.cache_key)
    challenger = AliasFollower(src.resolve, src.fetch, poll_s=60, drop_when_cleared=True)
    production = AliasFollower(src.resolve, src.fetch, poll_s=60)
    challenger.sync_once()
    production.sync_once()
    src.target = None  # both aliases removed
    challenger.sync_once()
    production.sync_once()
    assert challenger.served is None and challenger.status.last_outcome["outcome"] == "cleared"
    assert production.served.version == "4"  # Production keeps serving


def test_production_borrows_the_challengers_model_when_it_moves_there(tmp_path, loads):
    shadow_src = Source(Version("5", "run-5"), lambda v: tmp_path / v.cache_key)
    challenger = AliasFollower(shadow_src.resolve, shadow_src.fetch, poll_s=60)
    challenger.sync_once()
    src = Source(Version("1", "run-1"), lambda v: tmp_path / v.cache_key)
    production = AliasFollower(src.resolve, src.fetch, poll_s=60, borrow=challenger.loaded)
    production.sync_once()
    src.target = Version("5", "run-5")  # promoted from the shadow
    production.sync_once()
    assert production.served.model is challenger.served.model
    assert [v.version for v in src.fetches] == ["1"]  # nothing fetched for v5
    src.target = Version("5", "run-other")  # same number, another run: not borrowed
    production.sync_once()
    assert production.served.model is not challenger.served.model

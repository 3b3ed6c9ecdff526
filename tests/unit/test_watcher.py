"""The registry watcher's failure handling, with stand-in resolve/fetch callables."""

import json
import os
import time

from core.registry import Version
from serving.watcher import Watcher


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
    w = Watcher(src.resolve, src.fetch, poll_s=0.05, status_file=tmp_path / "w.json")
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


def test_a_verified_bad_version_is_refused_until_the_alias_moves(tmp_path):
    def junk(version):  # downloads fine, but is no loadable artifact
        folder = tmp_path / version.cache_key
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"not weights")
        return folder

    src = Source(Version("3", "run-a"), junk)
    w = Watcher(src.resolve, src.fetch, poll_s=0.01)
    w.sync_once()
    time.sleep(0.02)
    w.sync_once()
    assert len(src.fetches) == 1 and w.status.last_outcome["outcome"] == "failed"
    assert w.served is None and w.status.failures == 1
    # a registry reset: "v3" again, but another run: a different model, tried afresh
    src.target = Version("3", "run-b")
    w.sync_once()
    assert [v.run_id for v in src.fetches] == ["run-a", "run-b"]


def test_versions_are_cached_by_version_and_run():
    assert Version("1", "abc").cache_key != Version("1", "def").cache_key
    assert Version("1", "abc", "models:/x") == Version("1", "abc", "")  # source is no identity

"""A training output folder names its own artifact wherever it is moved or copied."""

import json
import shutil

from model.result import FILE, TrainResult


def _result(out):
    (out / "artifact").mkdir(parents=True)
    (out / "artifact" / "marker").write_text(str(out))
    return TrainResult(out / "artifact", out / "runs", {"train_rows": 3}, {"train": {}})


def test_a_copied_output_folder_reads_its_own_artifact_not_the_original(tmp_path):
    first = tmp_path / "first"
    _result(first).write(first)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(first, copy)
    (copy / "artifact" / "marker").write_text("changed in the copy")
    got = TrainResult.read(copy)
    assert got.artifact == copy / "artifact" and got.runs == copy / "runs"
    assert (got.artifact / "marker").read_text() == "changed in the copy"
    assert TrainResult.read(first).artifact == first / "artifact"
    assert json.loads((first / FILE).read_text())["artifact"] == "artifact"


def test_a_result_written_with_absolute_paths_still_reads(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    art = tmp_path / "somewhere" / "artifact"
    doc = {"artifact": str(art), "runs": str(tmp_path / "runs"), "metrics": {}, "config": {}}
    (out / FILE).write_text(json.dumps(doc))
    assert TrainResult.read(out).artifact == art
    # and a path outside the folder is written as it is
    TrainResult(art, tmp_path / "runs", {}, {}).write(out)
    assert TrainResult.read(out).artifact == art

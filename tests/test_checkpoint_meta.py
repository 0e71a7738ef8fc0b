import json
import os

import pytest

from qalign_kvq.checkpoint import META_FILE, CheckpointMeta


def test_meta_round_trip_records_range_and_bins(tmp_path):
    meta = CheckpointMeta(family="qwen2_5_vl", mos_low=1.306, mos_high=4.5, base_model="org/base",
                          metrics={"SROCC": 0.9, "PLCC": 0.91, "Rank1": 0.7, "Rank2": 0.8, "Final": 0.89})
    meta.save(tmp_path)
    stored = json.loads((tmp_path / META_FILE).read_text())
    assert stored["bin_edges"] == pytest.approx([1.9448, 2.5836, 3.2224, 3.8612])
    assert stored["level_words"] == ["excellent", "good", "fair", "poor", "bad"]
    assert CheckpointMeta.load(tmp_path) == meta
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write leaves no temporary file


def test_meta_file_gets_the_umasks_mode(tmp_path):
    old = os.umask(0o022)
    try:
        CheckpointMeta(family="qwen2_vl").save(tmp_path)
    finally:
        os.umask(old)
    assert (tmp_path / META_FILE).stat().st_mode & 0o777 == 0o644  # others on a cluster can read it


def test_not_a_checkpoint_and_bad_json_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a qalign-kvq checkpoint"):
        CheckpointMeta.load(tmp_path)
    (tmp_path / META_FILE).write_text("{oops")
    with pytest.raises(ValueError, match="invalid JSON"):
        CheckpointMeta.load(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"family": "x", "colour": "red"}))
    with pytest.raises(ValueError, match="unknown fields"):
        CheckpointMeta.load(tmp_path)

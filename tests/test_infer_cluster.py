"""Batch scoring as two gloo processes launched like torchrun's (each rank its own "node" with its
own working directory where a test needs it): a file that raises an exception of no expected type,
an output folder that is not shared, stale views of the inputs on one node; and, in one process,
the exception policy of ``score_one`` and the completeness count."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch

from qalign_kvq import infer
from qalign_kvq.records import tally
from tests.distributed_support import cpu_env, run_ranks, with_sitecustomize
from tests.test_infer import FAST, _records, checkpoint, good_videos  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow
INFER = ["-m", "qalign_kvq.infer"]
# A reader defect met on one file (as IndexError, a type score_one did not expect before).
DEFECT = """
from pathlib import Path
import qalign_kvq.video as video
read_frames = video.read_frames
def defective(path, indices, *args, **kwargs):
    if Path(path).name == "defect.mp4":
        raise IndexError(f"{path}: frame indices [11] out of range for a video of 11 frames")
    return read_frames(path, indices, *args, **kwargs)
video.read_frames = defective
"""


def test_an_unexpected_exception_is_recorded_and_every_rank_exits_1(checkpoint, good_videos, tmp_path):
    folder = tmp_path / "test"
    shutil.copytree(good_videos.parent / "test", folder)
    shutil.copy(folder / "landscape.mp4", folder / "defect.mp4")
    output = tmp_path / "pred.jsonl"
    env = with_sitecustomize(cpu_env(), tmp_path / "site", DEFECT)
    results = run_ranks([*INFER, "--videos", str(folder), "--model", str(checkpoint), *FAST, "--output", str(output)],
                        env)
    assert [code for code, _ in results] == [1, 1], results[0][1][-3000:] + results[1][1][-3000:]
    records = _records(output)
    assert [r["file"] for r in records] == sorted(p.name for p in folder.iterdir())  # input order, all of them
    errors = [r for r in records if "error" in r]
    assert errors == [{"file": "defect.mp4",
                       "error": f"IndexError: {folder / 'defect.mp4'}: frame indices [11] out of range for a "
                                "video of 11 frames"}]
    assert all("score" in r for r in records if r["file"] != "defect.mp4")
    log = results[0][1] + results[1][1]
    assert "unexpected IndexError scoring defect.mp4 (recorded as its error)" in log
    assert "6 scored, 1 failed, 0 without a record, 7 this run" in results[0][1]
    assert not list(tmp_path.glob("pred.jsonl.part*"))


def test_an_output_folder_rank_0_cannot_see_fails_every_rank_before_scoring(checkpoint, good_videos, tmp_path):
    # node-local disks: the same relative --output is a different folder on each node
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    args = [*INFER, "--videos", str(good_videos), "--model", str(checkpoint), *FAST, "--output", "out/pred.csv"]
    host = socket.gethostname()
    for node, (code, text) in zip(nodes, run_ranks(args, cpu_env(), cwds=nodes)):
        assert code == 2, text[-3000:]
        assert (f"error: {node / 'out'} is not one folder shared by all 2 processes: process 0 ({host}) does not "
                f"see the files process 1 ({host}) writes there. Scoring with several processes needs --output on "
                "storage every node sees") in text, text[-3000:]
        assert "videos to score" not in text  # nothing was scored
    assert not any(p.name.startswith(".qalign_kvq-shared") for node in nodes for p in (node / "out").iterdir())
    assert not (nodes[0] / "out" / "pred.csv.jsonl").exists()


def test_one_to_do_list_for_all_ranks_even_when_a_node_sees_fewer_inputs(checkpoint, good_videos, tmp_path):
    # --videos is relative: node 1's copy of the folder is stale (2 of the 6 videos)
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    shutil.copytree(good_videos.parent / "test", nodes[0] / "test")
    (nodes[1] / "test").mkdir(parents=True)
    for name in ("landscape.mp4", "portrait.mp4"):
        shutil.copy(nodes[0] / "test" / name, nodes[1] / "test" / name)
    output = tmp_path / "shared" / "pred.jsonl"
    results = run_ranks([*INFER, "--videos", "test", "--model", str(checkpoint), *FAST, "--output", str(output)],
                        cpu_env(), cwds=nodes)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert "process 0/2: 3 of 6 videos to score" in results[0][1]
    assert "process 1/2: 3 of 6 videos to score" in results[1][1]
    records = _records(output)
    assert [r["file"] for r in records] == sorted(p.name for p in (nodes[0] / "test").iterdir())
    assert all("score" in r for r in records)


class _Raises:
    """A scorer whose ``score`` raises ``error`` (the exception policy of score_one, one type at a time)."""

    def __init__(self, error: BaseException):
        self.error = error

    def score(self, path):
        raise self.error


def test_score_one_records_what_belongs_to_the_video_and_propagates_the_rest(tmp_path):
    from qalign_kvq.video import VideoDecodeError

    path = tmp_path / "x.mp4"
    assert infer.score_one(_Raises(VideoDecodeError(path, "truncated")), "x.mp4", path) == {
        "file": "x.mp4", "error": "truncated"}
    assert infer.score_one(_Raises(KeyError("fps")), "x.mp4", path) == {"file": "x.mp4", "error": "KeyError: 'fps'"}
    oom = infer.score_one(_Raises(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")),
                          "x.mp4", path)
    assert oom == {"file": "x.mp4", "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB "
                                             "(try --views-per-forward with fewer views)"}
    with pytest.raises(infer.DeviceError, match="x.mp4: CUDA error: an illegal memory access"):
        infer.score_one(_Raises(torch.AcceleratorError("CUDA error: an illegal memory access")), "x.mp4", path)
    with pytest.raises(KeyboardInterrupt):
        infer.score_one(_Raises(KeyboardInterrupt()), "x.mp4", path)


def test_tally_finds_inputs_without_a_record(tmp_path):
    records = tmp_path / "pred.jsonl"
    records.write_text(json.dumps({"file": "a.mp4", "score": 3.0}) + "\n")
    (tmp_path / "pred.jsonl.part1").write_text(json.dumps({"file": "c.mp4", "error": "truncated"}) + "\n")
    (tmp_path / "pred.jsonl.part3").write_text(json.dumps({"file": "d.mp4", "score": 2.0}) + "\n")  # not a rank
    assert tally(records, ["a.mp4", "b.mp4", "c.mp4", "d.mp4"], world_size=2) == {
        "scored": 1, "errors": [{"file": "c.mp4", "error": "truncated"}], "missing": ["b.mp4", "d.mp4"]}

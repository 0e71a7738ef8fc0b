"""The pipelined batch scorer: DataLoader workers give the same records as the sequential path, in
input order; a corrupt file among good ones and a worker that dies on a file are recorded and the
rest scored; views of several videos share a forward with the scores of one video at a time; a
killed pipelined run resumes to the same file; two ranks with workers each."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from torch.utils.data import get_worker_info

from qalign_kvq import infer, pipeline
from qalign_kvq.scorer import Scorer
from qalign_kvq.video import VideoError
from qalign_kvq.view_batches import score_videos, spec_of
from tests.distributed_support import cpu_env, run_ranks, with_sitecustomize
from tests.test_infer import (  # noqa: F401 (checkpoint, good_videos: fixtures)
    FAST,
    _records,
    _strip_timing,
    checkpoint,
    good_videos,
    kill_after_records,
)

torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): records compared byte for byte


@pytest.fixture(scope="module")
def scorer(checkpoint):  # noqa: F811
    return Scorer.from_pretrained(str(checkpoint), device="cpu", frames=4)


@pytest.fixture(scope="module")
def mixed(video_corpus, broken_videos):
    """Good clips of several sizes with broken files among them, as ``(name, path)``."""
    names = ["landscape", "zero_bytes", "portrait", "vfr", "truncated", "rotated", "sandwich_blur"]
    return [(n, video_corpus[n] if n in video_corpus else broken_videos[n]) for n in names]


def _plain(outcomes):
    return [_strip_timing([o.record()])[0] for o in outcomes]


def test_workers_give_the_sequential_records_in_input_order(scorer, mixed):
    sequential = list(score_videos(scorer, mixed, workers=0))
    pipelined = list(score_videos(scorer, mixed, workers=2, prefetch=1))
    assert [o.name for o in pipelined] == [name for name, _ in mixed]
    assert _plain(pipelined) == _plain(sequential)
    errors = {o.name: o.error for o in pipelined if o.error}
    assert set(errors) == {"zero_bytes", "truncated"} and "empty" in errors["zero_bytes"]
    # and the scores of Scorer.score, one video at a time
    for (name, path), outcome in zip(mixed, pipelined):
        if outcome.result is not None:
            assert outcome.result.score == pytest.approx(scorer.score(path).score, abs=1e-6)
            assert set(outcome.result.timing) == {"decode_s", "views_s", "processor_s", "model_s", "total_s"}


def test_score_many_yields_in_order_and_raises_a_bad_files_error(scorer, video_corpus, broken_videos):
    paths = [video_corpus["landscape"], video_corpus["portrait"], broken_videos["text_as_mp4"], video_corpus["vfr"]]
    results = scorer.score_many(paths, workers=2)
    assert [r.file for r in (next(results), next(results))] == [str(p) for p in paths[:2]]
    with pytest.raises(VideoError, match="text_as_mp4"):
        next(results)
    assert [r.score for r in scorer.score_many(paths[:2], workers=1)] == pytest.approx(
        [scorer.score(p).score for p in paths[:2]], abs=1e-6)


def _dies_on_crash_files(real):
    def read_frames(path, indices, *args, **kwargs):
        if Path(path).name.startswith("crash") and get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)  # a worker that dies hard on this file
        return real(path, indices, *args, **kwargs)
    return read_frames


def test_a_worker_that_dies_on_a_file_is_recorded_and_the_rest_scored(scorer, video_corpus, tmp_path, monkeypatch):
    crash = tmp_path / "crash.mp4"
    shutil.copy(video_corpus["landscape"], crash)
    monkeypatch.setattr(pipeline, "read_frames", _dies_on_crash_files(pipeline.read_frames))
    items = [("a", video_corpus["landscape"]), ("b", video_corpus["portrait"]), ("crash", crash),
             ("c", video_corpus["vfr"]), ("d", video_corpus["rotated"])]
    outcomes = list(score_videos(scorer, items, workers=2))
    assert [o.name for o in outcomes] == ["a", "b", "crash", "c", "d"]
    assert outcomes[2].result is None and "the DataLoader worker reading it died" in outcomes[2].error
    assert all(o.result is not None for i, o in enumerate(outcomes) if i != 2)
    # in the main process (workers=0) the same file scores: the worker's death was the only fault
    assert next(score_videos(scorer, items[2:3], workers=0)).result is not None


@pytest.mark.slow
def test_workers_dying_on_every_file_stop_the_run(scorer, video_corpus, tmp_path, monkeypatch):
    for name in ("crash1.mp4", "crash2.mp4"):
        shutil.copy(video_corpus["landscape"], tmp_path / name)
    monkeypatch.setattr(pipeline, "read_frames", _dies_on_crash_files(pipeline.read_frames))
    monkeypatch.setattr(pipeline, "MAX_CRASHES_IN_A_ROW", 2)
    items = [("a", video_corpus["portrait"]), ("c1", tmp_path / "crash1.mp4"), ("c2", tmp_path / "crash2.mp4"),
             ("b", video_corpus["vfr"])]
    seen = []
    with pytest.raises(pipeline.WorkerError, match="died on 2 files in a row .*/dev/shm"):
        for outcome in score_videos(scorer, items, workers=1):
            seen.append(outcome.name)
    assert seen == ["a", "c1"]


def _forward_sizes(scorer):
    sizes = []
    hook = scorer.models[0].model.register_forward_hook(
        lambda module, args, kwargs, out: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    return sizes, hook


def test_views_of_several_videos_share_a_forward_with_the_same_scores(checkpoint, video_corpus):  # noqa: F811
    # two frame sizes (different token counts): rows of one size only are put together
    items = [(f"{k}{i}", video_corpus[k]) for i, k in enumerate(["landscape", "vfr", "landscape", "landscape", "vfr"])]
    alone = Scorer.from_pretrained(str(checkpoint), device="cpu", frames=4)
    shared = Scorer.from_pretrained(str(checkpoint), device="cpu", frames=4, batch_size=10)
    sizes, hook = _forward_sizes(alone)
    one_at_a_time = list(score_videos(alone, items, workers=0))
    hook.remove()
    assert sizes == [5] * 5  # one video's five views a forward
    sizes, hook = _forward_sizes(shared)
    together = list(score_videos(shared, items, workers=1))
    hook.remove()
    assert sizes == [10, 10, 5]  # landscape0+2, vfr1+4, landscape3
    assert [o.name for o in together] == [name for name, _ in items]
    for a, b in zip(one_at_a_time, together):
        assert b.result.score == pytest.approx(a.result.score, abs=1e-6)
        assert list(b.result.probs.values()) == pytest.approx(list(a.result.probs.values()), abs=1e-6)
        assert b.result.view_tokens == a.result.view_tokens
    # a forward cuts across videos: 7 views a forward of 3 videos' 6 views (the full frame costs what a crop
    # does at the tiny model's frame budget)
    seven = Scorer.from_pretrained(str(checkpoint), device="cpu", frames=4, batch_size=7, include_full=True)
    sizes, hook = _forward_sizes(seven)
    cut = list(score_videos(seven, [items[0], items[2], items[3]], workers=0))
    hook.remove()
    assert sizes == [7, 7, 4]
    singles = [seven.score(path) for _, path in [items[0], items[2], items[3]]]
    assert [o.result.score for o in cut] == pytest.approx([r.score for r in singles], abs=1e-6)


def test_a_video_is_one_processor_call_unless_forwards_gather_views(checkpoint, video_corpus):  # noqa: F811
    # the rows each video's views travel in: one of all five, or (views of several videos a forward) one a view
    for batch_size, rows in [(None, [5]), (10, [1] * 5)]:
        spec = spec_of(Scorer.from_pretrained(str(checkpoint), device="cpu", frames=4, batch_size=batch_size))
        prepared = pipeline.prepare(spec, 0, "landscape", str(video_corpus["landscape"]))
        assert [len(row.level_positions) for row in prepared.inputs[0]] == rows


def test_processor_on_a_device_scores_the_same(checkpoint, scorer, mixed):  # noqa: F811
    on_device = Scorer.from_pretrained(str(checkpoint), device="cpu", frames=4, processor_device="cpu")
    assert _plain(score_videos(on_device, mixed, workers=1)) == _plain(score_videos(scorer, mixed))


def test_default_workers_follow_the_cpus(monkeypatch):
    for cpus, processes, videos, expected in [(1, 1, 100, 0), (2, 1, 100, 1), (2, 2, 100, 0), (16, 1, 100, 8),
                                              (16, 4, 100, 3), (16, 1, 2, 2)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)))
        assert pipeline.default_workers(videos, processes) == expected


def test_a_killed_pipelined_run_resumes_to_the_same_file(checkpoint, good_videos, tmp_path):  # noqa: F811
    args = ["--videos", str(good_videos), "--model", str(checkpoint), *FAST, "--workers", "2",
            "--views-per-forward", "10"]
    whole = tmp_path / "whole.csv"
    assert infer.main([*args, "--output", str(whole)]) == 0
    killed = tmp_path / "killed.csv"
    records = kill_after_records(args, killed, 2)
    assert 2 <= records.read_text().count("\n") < 6 and not killed.exists()
    assert infer.main([*args, "--output", str(killed)]) == 0
    assert killed.read_bytes() == whole.read_bytes()
    assert _strip_timing(_records(records)) == _strip_timing(_records(infer.records_path(whole)))


# A worker of rank 1 dies hard on crash.mp4 (what a segfaulting decoder does).
CRASH = """
import os, signal
from pathlib import Path
import qalign_kvq.video as video
read_frames = video.read_frames
def dying(path, indices, *args, **kwargs):
    from torch.utils.data import get_worker_info
    if Path(path).name == "crash.mp4" and get_worker_info() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return read_frames(path, indices, *args, **kwargs)
video.read_frames = dying
"""


@pytest.mark.slow
def test_two_ranks_with_workers_record_a_crash_and_a_corrupt_file(checkpoint, good_videos, broken_videos,  # noqa: F811
                                                                    tmp_path):
    folder = tmp_path / "test"
    shutil.copytree(good_videos.parent / "test", folder)
    shutil.copy(folder / "landscape.mp4", folder / "crash.mp4")
    shutil.copy(broken_videos["truncated"], folder / "bad.mp4")
    output = tmp_path / "pred.jsonl"
    env = with_sitecustomize(cpu_env(), tmp_path / "site", CRASH)
    results = run_ranks(["-m", "qalign_kvq.infer", "--videos", str(folder), "--model", str(checkpoint), *FAST,
                         "--workers", "1", "--output", str(output)], env)
    assert [code for code, _ in results] == [1, 1], results[0][1][-3000:] + results[1][1][-3000:]
    records = _records(output)
    assert [r["file"] for r in records] == sorted(p.name for p in folder.iterdir())
    errors = {r["file"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {"bad.mp4", "crash.mp4"}
    assert "the DataLoader worker reading it died" in errors["crash.mp4"]
    assert "6 scored, 2 failed, 0 without a record, 8 this run" in results[0][1]
    assert all(r.get("score") for r in records if r["file"] not in errors)


def test_a_model_ensemble_scores_as_one_video_at_a_time(checkpoint, video_corpus):  # noqa: F811
    pair = Scorer.from_pretrained([str(checkpoint), str(checkpoint)], device="cpu", frames=4, weights=[1, 3],
                                  batch_size=10)
    paths = [video_corpus["landscape"], video_corpus["portrait"], video_corpus["landscape"]]
    outcomes = list(score_videos(pair, [(str(i), p) for i, p in enumerate(paths)], workers=1))
    for outcome, path in zip(outcomes, paths):
        alone = pair.score(path)
        assert outcome.result.score == pytest.approx(alone.score, abs=1e-6)
        assert [m["score"] for m in outcome.result.models] == pytest.approx([m["score"] for m in alone.models])

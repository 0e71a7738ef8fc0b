"""``python -m qalign_kvq.infer``: one video, batches with broken files, resume after a kill, CSV for
``qalign_kvq.evaluate``, calibration, and two processes under ``accelerate launch``."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qalign_kvq import evaluate, infer
from qalign_kvq.checkpoint import CheckpointMeta

torch.set_num_threads(2)
FAMILY = "qwen2_vl"
ROOT = Path(__file__).resolve().parents[1]
FAST = ["--frames", "4", "--no-progress"]  # 4 frames keep the CLI runs quick


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("infer") / FAMILY
    shutil.copytree(tiny_models(FAMILY), out)
    CheckpointMeta(family=FAMILY, mos_low=1.31, mos_high=4.5).save(out)
    return out


@pytest.fixture(scope="module")
def good_videos(video_corpus, tmp_path_factory):
    """A folder of six real clips and a KVQ-style truth CSV (filename,score) for them."""
    folder = tmp_path_factory.mktemp("good") / "test"
    folder.mkdir()
    names = ["landscape", "portrait", "sandwich_blur", "sandwich_black", "rotated", "vfr"]
    for name in names:
        shutil.copy(video_corpus[name], folder / f"{name}.mp4")
    truth = folder.parent / "truth.csv"
    with open(truth, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "score"])
        for i, name in enumerate(names):
            writer.writerow([f"test/{name}.mp4", f"{1.5 + 0.5 * i:.2f}"])
    return truth


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _strip_timing(records):
    return [{k: v for k, v in r.items() if k != "timing"} for r in records]


def test_single_video_prints_one_json_object(checkpoint, sample_video, capsys):
    assert infer.main(["--video", str(sample_video), "--model", str(checkpoint), *FAST]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["file"] == str(sample_video)
    assert set(record) >= {"score", "score_1_5", "probs", "uncertainty", "views", "timing"}
    assert list(record["probs"]) == ["excellent", "good", "fair", "poor", "bad"]
    assert np.dot(list(record["probs"].values()), [5, 4, 3, 2, 1]) == pytest.approx(record["score_1_5"], abs=1e-6)
    assert record["score"] == pytest.approx(1.31 + (record["score_1_5"] - 0.5) * (4.5 - 1.31) / 5, abs=1e-6)
    assert len(record["views"]) == 5 and record["timing"]["model_s"] > 0


def test_usage_and_model_errors_exit_2(checkpoint, sample_video, tmp_path, capsys):
    assert infer.main(["--videos", str(sample_video), "--model", str(checkpoint)]) == 2
    assert "--output" in capsys.readouterr().err
    assert infer.main(["--video", str(sample_video), "--model", str(tmp_path / "no_model")]) == 2
    assert "no_model" in capsys.readouterr().err
    assert infer.main(["--video", str(sample_video), "--model", str(checkpoint), "--model-weight", "1", "2"]) == 2


def test_an_output_with_a_line_infer_does_not_write_exits_2_untouched(checkpoint, video_corpus, tmp_path, capsys):
    shutil.copy(video_corpus["landscape"], tmp_path / "a.mp4")
    for bad, reason in [("{not json\n", "out.jsonl:2: not a JSON record"),
                        ('{"score": 3.0}\n', "out.jsonl:2: expected an object with a 'file' name")]:
        out = tmp_path / "out.jsonl"
        text = '{"file": "old.mp4", "score": 2.5}\n' + bad + '{"file": "half'  # and a half-written last line
        out.write_text(text)
        assert infer.main(["--videos", str(tmp_path / "a.mp4"), "--model", str(checkpoint), "--output", str(out),
                           *FAST]) == 2
        err = capsys.readouterr().err
        assert reason in err and "nothing was changed" in err
        assert out.read_text() == text


def test_attention_implementation_is_passed_to_the_model(checkpoint, sample_video, capsys):
    from qalign_kvq.scorer import Scorer

    scorer = Scorer.from_pretrained(checkpoint, device="cpu", attn_implementation="eager", frames=4)
    assert scorer.models[0].model.config._attn_implementation == "eager"
    assert infer.main(["--video", str(sample_video), "--model", str(checkpoint), *FAST]) == 0
    default = json.loads(capsys.readouterr().out)
    assert infer.main(["--video", str(sample_video), "--model", str(checkpoint), *FAST, "--attn", "eager"]) == 0
    eager = json.loads(capsys.readouterr().out)
    assert eager["score"] == pytest.approx(default["score"], abs=1e-5)
    assert infer.main(["--video", str(sample_video), "--model", str(checkpoint), *FAST, "--attn", "no_such_attn"]) == 2
    assert "no_such_attn" in capsys.readouterr().err


def test_broken_files_are_recorded_and_the_batch_goes_on(checkpoint, video_corpus, broken_videos, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(video_corpus["landscape"], folder / "a_good.mp4")
    shutil.copy(video_corpus["portrait"], folder / "z_good.mp4")
    for name in ("zero_bytes", "text_as_mp4", "truncated", "audio_only"):
        src = broken_videos[name]
        shutil.copy(src, folder / f"bad_{name}{src.suffix}")
    out = tmp_path / "out.jsonl"
    code = infer.main(["--videos", str(folder), "--model", str(checkpoint), "--output", str(out), *FAST])
    assert code == 1
    records = {r["file"]: r for r in _records(out)}
    assert len(records) == 6
    assert 1.0 <= records["a_good.mp4"]["score_1_5"] <= 5.0 and "score" in records["z_good.mp4"]
    bad = {name: r for name, r in records.items() if name.startswith("bad_")}
    assert len(bad) == 4 and all(r["error"] and "score" not in r for r in bad.values())
    # a rerun has nothing left to do and still reports the failures
    assert infer.main(["--videos", str(folder), "--model", str(checkpoint), "--output", str(out), *FAST]) == 1
    assert len(_records(out)) == 6
    # --retry-errors scores the failed files again and replaces their records
    assert infer.main(["--videos", str(folder), "--model", str(checkpoint), "--output", str(out), *FAST,
                       "--retry-errors"]) == 1
    again = _records(out)
    assert len(again) == 6 and {r["file"] for r in again} == set(records)


def test_csv_output_feeds_evaluate(checkpoint, good_videos, tmp_path, capsys):
    pred = tmp_path / "prediction.csv"
    assert infer.main(["--videos", str(good_videos), "--model", str(checkpoint), "--output", str(pred), *FAST]) == 0
    rows = list(csv.DictReader(open(pred)))
    assert [r["filename"] for r in rows] == [r["filename"] for r in csv.DictReader(open(good_videos))]
    assert evaluate.main(["--pred", str(pred), "--truth", str(good_videos)]) == 0
    assert "SROCC" in capsys.readouterr().out


@pytest.fixture
def one_thread():
    """Torch on one thread in this process, as in the subprocesses (OMP_NUM_THREADS=1): scores are
    compared byte for byte, and sums over two threads differ in the last digits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def kill_after_records(args: list[str], output: Path, records_before_kill: int) -> Path:
    """Run ``python -m qalign_kvq.infer *args --output output`` and SIGKILL it once its records
    file holds ``records_before_kill`` lines; returns the records file."""
    records = infer.records_path(output)
    proc = subprocess.Popen([sys.executable, "-m", "qalign_kvq.infer", *args, "--output", str(output)],
                            env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if records.is_file() and records.read_text().count("\n") >= records_before_kill:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return records


def test_killed_batch_resumes_to_the_same_file(checkpoint, good_videos, tmp_path, one_thread):
    args = ["--videos", str(good_videos), "--model", str(checkpoint), *FAST]
    whole = tmp_path / "whole.csv"
    assert infer.main([*args, "--output", str(whole)]) == 0

    killed = tmp_path / "killed.csv"
    records = kill_after_records(args, killed, 2)
    half = records.read_text()
    assert 2 <= half.count("\n") < 6 and not killed.exists()
    # the worst case of a kill: half a line at the end (it is cut off on resume)
    records.write_text(half + '{"file": "test/vfr.mp4", "sco')
    assert infer.main([*args, "--output", str(killed)]) == 0
    assert killed.read_bytes() == whole.read_bytes()
    assert _strip_timing(_records(records)) == _strip_timing(_records(infer.records_path(whole)))

    # leftovers of an interrupted two-process run (part files) are merged in input order, the rest scored
    parted = tmp_path / "parted.jsonl"
    done = _records(infer.records_path(whole))
    Path(f"{parted}.part1").write_text("".join(json.dumps(r) + "\n" for r in done[3:5]))
    Path(f"{parted}.part0").write_text(json.dumps(done[0]) + "\n")
    assert infer.main([*args, "--output", str(parted)]) == 0
    assert _strip_timing(_records(parted)) == _strip_timing(done)
    assert not list(tmp_path.glob("parted.jsonl.part*"))


def test_calibrate_stores_an_affine_map(checkpoint, good_videos, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    before = tmp_path / "before.jsonl"
    assert infer.main(["--videos", str(good_videos), "--model", str(ckpt), "--output", str(before), *FAST]) == 0
    assert infer.main(["--calibrate", str(good_videos), "--model", str(ckpt), *FAST]) == 0
    fit = json.loads(capsys.readouterr().out)["calibration"][0]
    meta = CheckpointMeta.load(ckpt)
    assert meta.calibration == {"a": pytest.approx(fit["a"]), "b": pytest.approx(fit["b"])}
    after = tmp_path / "after.jsonl"
    assert infer.main(["--videos", str(good_videos), "--model", str(ckpt), "--output", str(after), *FAST]) == 0
    s = np.array([r["score_1_5"] for r in _records(before)])
    calibrated = np.array([r["score"] for r in _records(after)])
    mos = np.array([1.5 + 0.5 * i for i in range(6)])
    np.testing.assert_allclose(calibrated, meta.calibration["a"] * s + meta.calibration["b"], atol=1e-6)
    # least squares: residuals sum to zero; affine: PLCC unchanged
    assert np.sum(mos - calibrated) == pytest.approx(0.0, abs=1e-6)
    assert np.corrcoef(calibrated, mos)[0, 1] == pytest.approx(abs(np.corrcoef(s, mos)[0, 1]), abs=1e-9)


@pytest.mark.slow
def test_two_processes_give_the_same_records(checkpoint, good_videos, tmp_path):
    args = ["--videos", str(good_videos), "--model", str(checkpoint), *FAST]
    one = tmp_path / "one.jsonl"
    assert infer.main([*args, "--output", str(one)]) == 0
    two = tmp_path / "two.jsonl"
    env = {**_env(), "ACCELERATE_USE_CPU": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "-m", "qalign_kvq.infer", *args, "--output", str(two)]
    proc = subprocess.run(launcher, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0/2: 3 of 6" in proc.stderr and "process 1/2: 3 of 6" in proc.stderr
    a, b = _records(one), _records(two)
    assert [r["file"] for r in a] == [r["file"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["score"] == pytest.approx(ra["score"], abs=1e-5)
        assert rb["probs"] == pytest.approx(ra["probs"], abs=1e-5)
    assert not list(tmp_path.glob("two.jsonl.part*"))

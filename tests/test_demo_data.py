"""The real-content demo set (scripts/make_demo_data.py): formats, split by source, pair labels,
score sanity against an independent SSIM, determinism."""

from __future__ import annotations

import csv
import itertools
import re
import subprocess
import sys
from pathlib import Path

import av
import make_demo_data as demo
import numpy as np
import pytest
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

ROOT = Path(__file__).resolve().parents[1]
NUM_SOURCES = 6  # the fewest with non-homologous test pairs: test 2, val 1, train 3 sources
FRAMES = 24  # shorter clips than the default, to keep the two builds quick


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The reduced set, built through the command line."""
    out = tmp_path_factory.mktemp("demo") / "set"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--out", str(out),
                           "--sources", str(NUM_SOURCES), "--seed", "0", "--frames", str(FRAMES)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "not human opinion" in proc.stdout
    return out


def _manifest(out: Path) -> list[dict]:
    return _read(out / "manifest.csv")


def test_csv_formats_and_files(built):
    for split in demo.SPLITS:
        with open(built / f"{split}.csv") as f:
            assert f.readline() == "filename,score\n"
        rows = _read(built / f"{split}.csv")
        assert rows and len(rows) % 7 == 0
        for row in rows:
            assert row["filename"].startswith(f"{split}/") and row["filename"].endswith(".mp4")
            assert (built / row["filename"]).is_file()
            assert 1.0 <= float(row["score"]) <= 5.0
            assert len(row["score"].split(".")[1]) == 4
    for split, tag in itertools.product(("val", "test"), ("homologous", "nonhomologous")):
        with open(built / f"{split}_pairs_{tag}.csv") as f:
            assert f.readline() == "video1,video2,label\n"
    readme = (built / "README.md").read_text()
    assert "not human opinion scores" in readme and "SSIM" in readme
    # the videos are what the README says: H.264 on the 9:16 canvas, the asked number of frames
    with av.open(str(built / _read(built / "test.csv")[0]["filename"])) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (demo.CANVAS_W, demo.CANVAS_H)
        assert stream.codec_context.name == "h264"
        assert sum(1 for _ in container.decode(video=0)) == FRAMES


def test_split_is_by_source(built):
    manifest = _manifest(built)
    assert len(manifest) == 7 * NUM_SOURCES
    split_of, split_of_origin = {}, {}
    for row in manifest:
        assert split_of.setdefault(row["source"], row["split"]) == row["split"], row["source"]
        assert split_of_origin.setdefault(row["origin"], row["split"]) == row["split"], row["origin"]
    assert sorted(set(split_of.values())) == sorted(demo.SPLITS)
    assert [s for s in split_of.values()].count("test") == 2
    for split in demo.SPLITS:
        listed = {r["filename"]: r["score"] for r in _read(built / f"{split}.csv")}
        assert listed == {r["filename"]: r["score"] for r in manifest if r["split"] == split}


def test_pair_labels_agree_with_scores(built):
    score = {r["filename"]: float(r["score"]) for r in _manifest(built)}
    source = {r["filename"]: r["source"] for r in _manifest(built)}
    for split in ("val", "test"):
        names = [r["filename"] for r in _read(built / f"{split}.csv")]
        for tag in ("homologous", "nonhomologous"):
            pairs = _read(built / f"{split}_pairs_{tag}.csv")
            for p in pairs:
                a, b = p["video1"], p["video2"]
                assert a in names and b in names
                assert (source[a] == source[b]) == (tag == "homologous")
                assert score[a] != score[b]
                assert p["label"] == ("1" if score[a] > score[b] else "2")
            wanted = {frozenset((a, b)) for a, b in itertools.combinations(names, 2)
                      if (source[a] == source[b]) == (tag == "homologous") and score[a] != score[b]}
            assert {frozenset((p["video1"], p["video2"])) for p in pairs} == wanted
        labels = [p["label"] for p in _read(built / f"{split}_pairs_homologous.csv")]
        assert set(labels) == {"1", "2"}  # both orders occur
    assert len(_read(built / "test_pairs_nonhomologous.csv")) > 0


def test_pristine_scores_highest_and_quality_falls_with_qp(built):
    by_source: dict[str, list[dict]] = {}
    for row in _manifest(built):
        by_source.setdefault(row["source"], []).append(row)
    for name, rows in by_source.items():
        pristine = [r for r in rows if r["process"] == "pristine"]
        assert len(pristine) == 1 and float(pristine[0]["score"]) == 5.0
        assert all(float(r["score"]) < 5.0 for r in rows if r["process"] != "pristine"), name
        transcodes = sorted((int(r["qp"]), float(r["score"])) for r in rows if r["process"] == "transcode")
        assert len(transcodes) == 3
        assert transcodes[0][0] >= 16 and transcodes[-1][0] <= 47
        scores = [s for _, s in transcodes]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == 3, (name, transcodes)


def test_strong_distortions_score_below_a_light_transcode(built):
    """Every source's down-scaled (1/3 or 1/2) and blurred/noisy versions are clearly worse than its
    light transcode (QP <= 28): the set spans visible severities, not only near-invisible ones."""
    by_source: dict[str, dict[str, float]] = {}
    for row in _manifest(built):
        by_source.setdefault(row["source"], {})[row["version"]] = float(row["score"])
    for name, score in by_source.items():
        assert score["5"] < score["2"] - 0.3 and score["6"] < score["2"] - 0.3, (name, score)


def _luma(path: Path, size: tuple[int, int]) -> np.ndarray:
    with av.open(str(path)) as container:
        frames = [f.to_image().convert("L").resize(size) for i, f in enumerate(container.decode(video=0)) if i % 4 == 0]
    return np.stack([np.asarray(f, dtype=np.float64) for f in frames])


def test_scores_follow_an_independent_ssim(built):
    """The labels rank one source's versions like scikit-image's SSIM on decoded luma does."""
    rows = [r for r in _manifest(built) if r["source"] == demo.CATALOGUE[0].name]
    ref = _luma(built / rows[0]["filename"], (demo.CANVAS_W, demo.CANVAS_H))
    ours, theirs = [], []
    for row in rows[1:]:
        dist = _luma(built / row["filename"], (demo.CANVAS_W, demo.CANVAS_H))
        theirs.append(np.mean([structural_similarity(r, d, data_range=255) for r, d in zip(ref, dist)]))
        ours.append(float(row["score"]))
    assert spearmanr(ours, theirs).statistic >= 0.8, (ours, theirs)


def test_same_command_gives_identical_files(built, tmp_path):
    demo.build(tmp_path, NUM_SOURCES, seed=0, jobs=2, num_frames=FRAMES)
    names = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    for name in names:
        assert (built / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_ssim_to_score_is_monotonic_and_documented():
    values = np.linspace(0.0, 1.0, 2001)
    scores = [demo.ssim_to_score(v) for v in values]
    assert np.all(np.diff(scores) >= 0)
    assert demo.ssim_to_score(1.0) == 5.0 and demo.ssim_to_score(0.998) == 5.0
    assert demo.ssim_to_score(1 - 10**-0.2) == 1.0 and demo.ssim_to_score(0.1) == 1.0  # 2 dB: SSIM 0.369
    assert demo.ssim_to_score(0.99) == pytest.approx(1 + 4 * (20 - 2) / 24, abs=1e-4)


def test_too_few_sources_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="between 3 and"):
        demo.build(tmp_path, 2)
    with pytest.raises(ValueError, match="--frames"):
        demo.build(tmp_path, 4, num_frames=1)
    with pytest.raises(ValueError, match="at least 3 sources"):
        demo.split_sources(["a", "b"], 0)
    with pytest.raises(ValueError, match="at least 3 sources"):
        demo.split_sources(["a1", "a2", "b"], 0, groups=["a", "a", "b"])


def test_clips_of_one_video_stay_in_one_split():
    names = [s.name for s in demo.CATALOGUE]
    for seed in range(20):
        split = demo.split_sources(names, seed, groups=[s.ref for s in demo.CATALOGUE],
                                   strata=[s.kind for s in demo.CATALOGUE])
        assert split["bunny_a"] == split["bunny_b"] and split["bikes_a"] == split["bikes_b"]
        # 3 videos, 12 photos: test and train each get a video and photos
        for sp in ("train", "test"):
            kinds = {s.kind for s in demo.CATALOGUE if split[s.name] == sp}
            assert kinds == {"video", "photo"}, (seed, sp, split)
        assert any(split[s.name] == "val" for s in demo.CATALOGUE)


def test_labels_are_learnable_without_reference(built, tmp_path):
    """The practice set's point: a no-reference model trained on its train split ranks the held-out
    test sources (scripts/practice_baseline.py). Measured on this reduced set (14 test videos):
    SROCC 0.79-0.81 over three seeds as built on 2026-11-27, 0.61-0.64 over seeds 0-2 as a fresh
    install builds it on 2026-12-02 (same code and reader frames: the set's encodes differ with
    the environment). 0.55 is well above chance for 14 videos (p ~ 0.04) and the tiny LMM's ~0.2."""
    from qalign_kvq.evaluate import compute_metrics, read_scores

    pred = tmp_path / "prediction.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "practice_baseline.py"), "--data", str(built),
                           "--output", str(pred), "--steps", "600", "--no-progress"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, last = (float(x) for x in re.search(r"L1 loss ([\d.]+) .* -> ([\d.]+)", proc.stdout).groups())
    assert last < 0.7 * first, proc.stdout
    truth = read_scores(built / "test.csv")
    scores = read_scores(pred)
    assert set(scores) == set(truth)
    assert compute_metrics(scores, truth)["SROCC"] >= 0.55


def test_local_contrast_normalisation_ignores_brightness_and_contrast():
    import torch
    from practice_baseline import local_contrast_normalise

    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    flat = local_contrast_normalise(torch.full((1, 1, 32, 32), 0.7))
    assert flat.abs().max() < 1e-4
    a, b = local_contrast_normalise(x, eps=1e-6), local_contrast_normalise(0.3 * x + 0.2, eps=1e-6)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_vision_probe_runs_and_reports_every_split(built, tiny_models):
    """scripts/probe_tiny_vision.py (the diagnostic behind the README's account of the demo) runs."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_tiny_vision.py"), "--model",
                           str(tiny_models("qwen2_5_vl")), "--data", str(built), "--steps", "4", "--eval-every", "2",
                           "--batch", "2"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2", "step 4"]
    assert all("'train'" in line and "'val'" in line and "'test'" in line for line in lines)

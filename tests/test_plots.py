"""qalign_kvq.plots and ``python -m qalign_kvq.evaluate --plot``: the pictures hold the data they were
given (read back from the drawn artists) and are written as real PNG files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qalign_kvq import evaluate
from qalign_kvq.evaluate import compute_metrics
from qalign_kvq.levels import LevelScale
from qalign_kvq.plots import CURVES_FILE, SCATTER_FILE, curve_series, save_curves, save_run_pictures, save_scatter


@pytest.fixture
def scored():
    rng = np.random.default_rng(3)
    truth = {f"test/{i:04d}.mp4": float(x) for i, x in enumerate(rng.uniform(1.31, 4.5, 40))}
    pred = {name: mos + float(rng.normal(0, 0.3)) for name, mos in truth.items()}
    return pred, truth


def _png(path, width, height):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.load()
        assert image.size == (width, height)
        pixels = np.asarray(image.convert("L"))
    assert path.stat().st_size > 10_000
    assert pixels.std() > 10  # drawn, not a blank canvas


def test_scatter_draws_every_prediction_against_its_mos(tmp_path, scored):
    pred, truth = scored
    metrics = compute_metrics(pred, truth)
    scale = LevelScale(1.31, 4.5)
    data = save_scatter(tmp_path / "s.png", pred, truth, metrics, scale)
    assert data.names == sorted(truth)
    np.testing.assert_allclose(data.points[:, 0], [truth[n] for n in data.names])
    np.testing.assert_allclose(data.points[:, 1], [pred[n] for n in data.names])
    slope, intercept = np.polyfit(data.points[:, 0], data.points[:, 1], 1)
    assert (data.slope, data.intercept) == pytest.approx((slope, intercept))
    levels = scale.level_index([truth[n] for n in data.names])
    assert sorted(data.per_level) == sorted(set(levels.tolist()))
    for level, values in data.per_level.items():  # the strip of each true level holds its predictions
        expected = [pred[n] for n, lv in zip(data.names, levels) if lv == level]
        np.testing.assert_allclose(values, expected)
    assert sum(len(v) for v in data.per_level.values()) == len(pred)
    assert f"SROCC {metrics['SROCC']:.4f}" in data.title and f"PLCC {metrics['PLCC']:.4f}" in data.title
    assert "Rank1 n/a" in data.title and "(n = 40)" in data.title
    _png(tmp_path / "s.png", 1320, 600)


def test_scatter_refuses_mismatched_files(tmp_path, scored):
    pred, truth = scored
    with pytest.raises(ValueError, match="same files"):
        save_scatter(tmp_path / "s.png", dict(list(pred.items())[1:]), truth, {})
    assert not (tmp_path / "s.png").exists()


def test_evaluate_cli_writes_the_scatter(tmp_path, scored, capsys):
    pred, truth = scored
    for name, table in (("pred.csv", pred), ("truth.csv", truth)):
        (tmp_path / name).write_text("filename,score\n" + "".join(f"{k},{v!r}\n" for k, v in table.items()))
    plot = tmp_path / "scatter.png"
    code = evaluate.main(["--pred", str(tmp_path / "pred.csv"), "--truth", str(tmp_path / "truth.csv"),
                          "--plot", str(plot), "--mos-range", "1.31", "4.5"])
    assert code == 0
    assert f"scatter plot: {plot}" in capsys.readouterr().out
    _png(plot, 1320, 600)
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--final", "1", "1", "1", "1", "--plot", str(plot)])
    assert info.value.code == 2
    code = evaluate.main(["--pred", str(tmp_path / "pred.csv"), "--truth", str(tmp_path / "truth.csv"),
                          "--plot", str(tmp_path / "no-such-dir" / "s.png")])
    assert code == 2 and "no-such-dir" in capsys.readouterr().err


# The shape of a Trainer's log_history: loss logs, evaluations per epoch, the final evaluate() of
# the best model at the last step, and the summary entry (train_loss, not a per-step loss).
HISTORY = [
    {"loss": 5.9, "grad_norm": 3.0, "learning_rate": 1e-3, "epoch": 0.5, "step": 5},
    {"loss": 5.1, "grad_norm": 2.0, "learning_rate": 9e-4, "epoch": 1.0, "step": 10},
    {"eval_loss": 5.0, "eval_SROCC": 0.31, "eval_PLCC": 0.28, "eval_Final": 0.33, "epoch": 1.0, "step": 10},
    {"loss": 4.2, "grad_norm": 1.5, "learning_rate": 5e-4, "epoch": 1.5, "step": 15},
    {"loss": 3.8, "grad_norm": 1.0, "learning_rate": 1e-4, "epoch": 2.0, "step": 20},
    {"eval_loss": 4.1, "eval_SROCC": 0.52, "eval_PLCC": 0.49, "eval_Final": 0.55, "epoch": 2.0, "step": 20},
    {"train_runtime": 12.0, "train_loss": 4.75, "epoch": 2.0, "step": 20},
    {"eval_loss": 4.1, "eval_SROCC": 0.50, "eval_PLCC": 0.47, "eval_Final": 0.53, "epoch": 2.0, "step": 20},
]


def test_curves_draw_the_logged_loss_and_one_evaluation_per_step(tmp_path):
    series = curve_series(HISTORY)
    np.testing.assert_allclose(series.loss, [[5, 5.9], [10, 5.1], [15, 4.2], [20, 3.8]])
    np.testing.assert_allclose(series.validation["SROCC"], [[10, 0.31], [20, 0.52]])
    assert sorted(series.validation) == ["Final", "PLCC", "SROCC"]
    drawn = save_curves(tmp_path / "c.png", HISTORY)
    np.testing.assert_allclose(drawn.loss, series.loss)
    for name in ("SROCC", "PLCC", "Final"):
        np.testing.assert_allclose(drawn.validation[name], series.validation[name])
    _png(tmp_path / "c.png", 1320, 480)
    loss_only = save_curves(tmp_path / "l.png", HISTORY[:2])
    assert loss_only.validation == {} and len(loss_only.loss) == 2
    _png(tmp_path / "l.png", 660, 480)


def test_run_pictures_replace_a_stale_scatter(tmp_path, scored):
    pred, truth = scored
    assert save_run_pictures(tmp_path, HISTORY, pred, truth, {"SROCC": 0.5}) == [tmp_path / CURVES_FILE,
                                                                                  tmp_path / SCATTER_FILE]
    assert save_run_pictures(tmp_path, HISTORY[:2]) == [tmp_path / CURVES_FILE]
    assert not (tmp_path / SCATTER_FILE).exists()  # a run without validation shows no old scatter
    assert sorted(p.name for p in tmp_path.iterdir()) == [CURVES_FILE]  # no temporary files left

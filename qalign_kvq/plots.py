"""Pictures of results, drawn with matplotlib's Agg canvas (no display, no pyplot state): the
predicted-score-against-MOS scatter of an evaluation and the curves of a fine-tuning run.

Each ``save_*`` function draws one figure, writes it as a PNG atomically and returns the data it
drew, read back from the plotted artists (so a test can check the picture holds the predictions).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qalign_kvq.levels import LEVEL_WORDS, LevelScale

#: What a fine-tuning run writes into its output directory (and the model card shows).
CURVES_FILE = "training_curves.png"
SCATTER_FILE = "validation_scatter.png"
RUN_PICTURES = {CURVES_FILE: "Training curves", SCATTER_FILE: "Validation: predicted score against MOS"}
#: The validation metrics drawn per evaluation (as the Trainer logs them, with the ``eval_`` prefix).
CURVE_METRICS = ("SROCC", "PLCC", "Final")
TITLE_METRICS = ("SROCC", "PLCC", "Rank1", "Rank2", "Final")


@dataclass
class ScatterData:
    """What :func:`save_scatter` drew: ``points`` (MOS, predicted) in ``names`` order, the fitted
    line ``predicted = slope * MOS + intercept``, the predictions per true level (1 = bad .. 5) and
    the title."""

    names: list[str]
    points: np.ndarray
    slope: float
    intercept: float
    per_level: dict[int, np.ndarray]
    title: str


@dataclass
class CurvesData:
    """What :func:`save_curves` drew: ``loss`` rows (step, training loss) and, per validation
    metric, rows (step, value)."""

    loss: np.ndarray
    validation: dict[str, np.ndarray] = field(default_factory=dict)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save_png(fig, path: str | os.PathLike, dpi: int) -> Path:
    """Write ``fig`` as a PNG into a temporary file beside ``path``, then rename it over ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # opened with the umask's mode, like any output
    try:
        with open(tmp, "wb") as handle:
            fig.savefig(handle, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def metrics_title(metrics: Mapping[str, float | None], count: int) -> str:
    parts = []
    for name in TITLE_METRICS:
        value = metrics.get(name)
        parts.append(f"{name} {'n/a' if value is None or not math.isfinite(value) else f'{value:.4f}'}")
    return "   ".join(parts) + f"   (n = {count})"


# ----- evaluation scatter -----------------------------------------------------------------------
def save_scatter(path: str | os.PathLike, pred: Mapping[str, float], truth: Mapping[str, float],
                 metrics: Mapping[str, float | None], scale: LevelScale | None = None, dpi: int = 120) -> ScatterData:
    """Left: predicted score against MOS with the identity and the least-squares line. Right: the
    predictions per true level (box and points), with the level bin edges of ``scale`` (default:
    five equal bins over the truth's range, the rule training uses). ``pred`` and ``truth`` cover
    the same files (as :func:`qalign_kvq.evaluate.compute_metrics` requires)."""
    names = sorted(truth)
    if set(pred) != set(truth) or len(names) < 2:
        raise ValueError("predictions and truth must cover the same files, at least two")
    mos = np.array([truth[n] for n in names], dtype=float)
    predicted = np.array([pred[n] for n in names], dtype=float)
    scale = scale or LevelScale.from_scores(mos)
    levels = scale.level_index(mos)
    slope, intercept = (float(v) for v in np.polyfit(mos, predicted, 1))
    title = metrics_title(metrics, len(names))

    fig = _figure(11, 5)
    left, right = fig.subplots(1, 2, sharey=True, width_ratios=(3, 2))
    points = left.scatter(mos, predicted, s=14, alpha=0.6, color="tab:blue", edgecolors="none", label="videos")
    low, high = min(mos.min(), predicted.min()), max(mos.max(), predicted.max())
    pad = 0.03 * (high - low or 1.0)
    span = np.array([low - pad, high + pad])
    left.plot(span, span, "--", color="0.5", linewidth=1, label="identity")
    left.plot(span, slope * span + intercept, color="tab:red", linewidth=1.2,
              label=f"fit: {slope:.3f} MOS {intercept:+.3f}")
    left.set(xlabel="MOS", ylabel="predicted score", xlim=tuple(span))
    left.legend(loc="upper left", fontsize=8)
    left.grid(alpha=0.3)

    present = [level for level in range(1, 6) if np.any(levels == level)]
    groups = [predicted[levels == level] for level in present]
    right.boxplot(groups, positions=present, widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)  # fixed jitter: the same picture for the same input
    per_level = {}
    for level, values in zip(present, groups):
        strip = right.scatter(level + rng.uniform(-0.18, 0.18, values.size), values, s=9, alpha=0.5,
                              color="tab:blue", edgecolors="none")
        per_level[level] = np.asarray(strip.get_offsets())[:, 1].copy()
    for edge in scale.edges:
        right.axhline(edge, color="0.7", linewidth=0.8, linestyle=":")
    right.set_xticks(range(1, 6), [f"{i}\n{LEVEL_WORDS[5 - i]}" for i in range(1, 6)])
    right.set(xlim=(0.4, 5.6), xlabel="true level (dotted: level bin edges)")
    right.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    _save_png(fig, path, dpi)
    return ScatterData(names=names, points=np.asarray(points.get_offsets()).copy(), slope=slope,
                       intercept=intercept, per_level=per_level, title=title)


# ----- training curves --------------------------------------------------------------------------
def curve_series(log_history: Sequence[Mapping]) -> CurvesData:
    """The training loss per logged step and the validation metrics per evaluation from a
    ``Trainer.state.log_history``. An evaluation logged again at a step that already has one (the
    recipe's final ``evaluate()`` of the best model after the last epoch's) is kept once, the first."""
    loss = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    validation = {}
    for name in CURVE_METRICS:
        rows, seen = [], set()
        for entry in log_history:
            key = f"eval_{name}"
            if key in entry and "step" in entry and entry["step"] not in seen:
                seen.add(entry["step"])
                rows.append((entry["step"], entry[key]))
        if rows:
            validation[name] = np.array(rows, dtype=float)
    return CurvesData(loss=np.array(loss, dtype=float).reshape(-1, 2), validation=validation)


def save_curves(path: str | os.PathLike, log_history: Sequence[Mapping], dpi: int = 120) -> CurvesData:
    """Training loss against step and, when the run was evaluated, validation SROCC / PLCC / Final
    against step (from ``Trainer.state.log_history``)."""
    series = curve_series(log_history)
    panels = 2 if series.validation else 1
    fig = _figure(5.5 * panels, 4)
    axes = np.atleast_1d(fig.subplots(1, panels))
    loss_ax = axes[0]
    drawn_loss = np.zeros((0, 2))
    if len(series.loss):
        (line,) = loss_ax.plot(series.loss[:, 0], series.loss[:, 1], marker="." if len(series.loss) < 50 else None,
                               color="tab:blue")
        drawn_loss = np.asarray(line.get_xydata()).copy()
    else:
        mean = [entry["train_loss"] for entry in log_history if "train_loss" in entry]
        note = f"mean training loss {mean[-1]:.4g}\n" if mean else ""
        loss_ax.text(0.5, 0.5, f"no per-step loss logged\n{note}(lower logging_steps for a curve)", ha="center",
                     va="center", transform=loss_ax.transAxes)
    loss_ax.set(xlabel="step", ylabel="training loss", title="training loss")
    loss_ax.grid(alpha=0.3)
    drawn_validation = {}
    if series.validation:
        val_ax = axes[1]
        for name, rows in series.validation.items():
            (line,) = val_ax.plot(rows[:, 0], rows[:, 1], marker="o", markersize=3, label=name)
            drawn_validation[name] = np.asarray(line.get_xydata()).copy()
        val_ax.set(xlabel="step", ylabel="metric", title="validation")
        val_ax.legend(fontsize=8)
        val_ax.grid(alpha=0.3)
    _save_png(fig, path, dpi)
    return CurvesData(loss=drawn_loss, validation=drawn_validation)


def save_run_pictures(directory: str | os.PathLike, log_history: Sequence[Mapping],
                      pred: Mapping[str, float] | None = None, truth: Mapping[str, float] | None = None,
                      metrics: Mapping[str, float | None] | None = None,
                      scale: LevelScale | None = None) -> list[Path]:
    """What a fine-tuning run leaves in ``directory``: :data:`CURVES_FILE` always, and
    :data:`SCATTER_FILE` when validation predictions are given. Returns the paths written."""
    directory = Path(directory)
    save_curves(directory / CURVES_FILE, log_history)
    written = [directory / CURVES_FILE]
    if pred and truth:
        save_scatter(directory / SCATTER_FILE, pred, truth, metrics or {}, scale)
        written.append(directory / SCATTER_FILE)
    else:
        (directory / SCATTER_FILE).unlink(missing_ok=True)  # a rerun's picture must not show a stale one
    return written

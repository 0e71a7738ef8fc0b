"""A small no-reference CNN trained on a practice set: a reference point for what its labels allow.

    python scripts/practice_baseline.py --data data/demo --output out/prediction.csv
    python -m qalign_kvq.evaluate --pred out/prediction.csv --truth data/demo/test.csv ...

The model is CNNIQA (Kang et al., "Convolutional Neural Networks for No-Reference Image Quality
Assessment", CVPR 2014) on luma: local contrast normalisation, 50 7x7 filters, max and min pooling,
two fully connected layers. It trains on random 32x32 patches of the train split's frames, each
labelled with its video's score (L1 loss), and scores a video as the mean over the patches of 8
evenly spaced frames. Every video is first resized to the most common frame size of the train split,
so that a down-scaled upload is seen up-scaled, as a player shows it.

It is not part of the toolkit's models. It answers one question about a practice set: can its
labels be learned from the pixels alone, without the reference video? On the practice set of
``scripts/make_demo_data.py`` it can (docs/benchmarks.md has the numbers), while the tiny random LMM
of ``make demo`` cannot, having no pretrained vision tower. The same seed gives the same scores.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qalign_kvq.evaluate import read_scores
from qalign_kvq.video import probe, read_frames, uniform_indices

PATCH = 32
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def local_contrast_normalise(x: torch.Tensor, size: int = 7, eps: float = 0.01) -> torch.Tensor:
    """``(x - local mean) / (local standard deviation + eps)`` over ``size x size`` windows (edges
    replicated); x: (N, 1, H, W)."""
    kernel = torch.full((1, 1, size, size), 1.0 / size**2, dtype=x.dtype)
    padded = F.pad(x, [size // 2] * 4, mode="replicate")
    mean = F.conv2d(padded, kernel)
    var = F.conv2d(padded * padded, kernel) - mean * mean
    return (x - mean) / (var.clamp_min(0).sqrt() + eps)


class CNNIQA(nn.Module):
    """Kang et al. 2014: LCN -> 50 7x7 filters -> max and min pooling -> 800 -> 1."""

    def __init__(self, filters: int = 50, hidden: int = 800):
        super().__init__()
        self.conv = nn.Conv2d(1, filters, 7)
        self.head = nn.Sequential(nn.Linear(2 * filters, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        h = self.conv(local_contrast_normalise(patches))
        return self.head(torch.cat([h.amax(dim=(2, 3)), h.amin(dim=(2, 3))], dim=1)).squeeze(-1)


def read_luma(path: Path, num_frames: int, size: tuple[int, int]) -> np.ndarray:
    """``num_frames`` evenly spaced frames of ``path`` as luma in [0, 1], resized to ``size`` (h, w)."""
    frames = read_frames(path, uniform_indices(probe(path).num_frames, num_frames)).astype(np.float32) / 255.0
    luma = torch.from_numpy(frames @ LUMA)[:, None]
    if tuple(luma.shape[2:]) != size:
        luma = F.interpolate(luma, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    return luma[:, 0].numpy()


def tile(luma: np.ndarray) -> torch.Tensor:
    """Non-overlapping PATCH x PATCH tiles of every frame: (N, 1, PATCH, PATCH)."""
    t = torch.from_numpy(luma)
    t = t[:, : t.shape[1] // PATCH * PATCH, : t.shape[2] // PATCH * PATCH]
    return t.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH).reshape(-1, 1, PATCH, PATCH)


def train(model: CNNIQA, videos: list[np.ndarray], scores: list[float], steps: int, batch: int,
          rng: np.random.Generator, progress: bool = True) -> list[float]:
    """Adam on random patches, each labelled with its video's score; the losses."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="train", disable=not progress):
        picks = rng.integers(len(videos), size=batch)
        patches = []
        for v in picks:
            clip = videos[v]
            t, y, x = rng.integers(len(clip)), rng.integers(clip.shape[1] - PATCH + 1), rng.integers(clip.shape[2] - PATCH + 1)
            patches.append(clip[t, y:y + PATCH, x:x + PATCH])
        loss = F.l1_loss(model(torch.from_numpy(np.stack(patches))[:, None]),
                         torch.tensor([scores[v] for v in picks], dtype=torch.float32))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def predict(model: CNNIQA, luma: np.ndarray) -> float:
    model.eval()
    return float(model(tile(luma)).mean())


def _height_width(path: Path) -> tuple[int, int]:
    info = probe(path)
    return info.height, info.width


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="practice set folder (train.csv, <split>.csv)")
    parser.add_argument("--split", default="test", help="the split to score (default test)")
    parser.add_argument("--output", type=Path, required=True, help="filename,score CSV to write")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    parser.add_argument("--batch", type=int, default=64, help="patches per step (default 64)")
    parser.add_argument("--train-frames", type=int, default=20, help="frames read per training video")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    train_scores = read_scores(args.data / "train.csv")
    to_score = read_scores(args.data / f"{args.split}.csv")
    size = Counter(_height_width(args.data / name) for name in train_scores).most_common(1)[0][0]
    videos = [read_luma(args.data / name, args.train_frames, size) for name in train_scores]
    model = CNNIQA()
    losses = train(model, videos, list(train_scores.values()), args.steps, args.batch, rng, not args.no_progress)
    print(f"trained on {len(videos)} videos at {size[1]}x{size[0]}: L1 loss {np.mean(losses[:50]):.3f} "
          f"(first 50 steps) -> {np.mean(losses[-50:]):.3f} (last 50)")
    predictions = {name: predict(model, read_luma(args.data / name, 8, size)) for name in to_score}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "score"])
        writer.writerows([name, f"{score:.6f}"] for name, score in predictions.items())
    tmp.replace(args.output)
    print(f"scored {len(predictions)} videos of {args.split}: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

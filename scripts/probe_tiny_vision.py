"""Can a model's vision tower alone learn a practice set's scores? A diagnostic for the demo.

    python scripts/probe_tiny_vision.py --model build/demo_models/qwen2_5_vl --data data/demo

Trains the Qwen-family vision tower of ``--model`` (its patch embedding, blocks and merger) plus a
linear head on the mean and standard deviation of its output tokens, directly on the scores (MSE),
with no language model in the way: each step takes ``--batch`` random two-frame clips of the train
split, each cropped to ``--crop`` of its sides. It prints the SROCC of the train, val and test splits
every ``--eval-every`` steps (4 evenly spaced frames a video).

``make demo``'s tiny LMM does not learn the practice set (README, "Two commands"). This shows where
it stops: the tiny random tower does not even fit the train split, while
``scripts/practice_baseline.py`` (a CNN with local contrast normalisation) learns it from the same
data. Nothing here is used by the toolkit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from transformers import AutoModelForImageTextToText, AutoProcessor

from qalign_kvq.evaluate import read_scores
from qalign_kvq.video import probe, read_frames, uniform_indices


def pooled(visual, video_processor, clips: list[np.ndarray]) -> torch.Tensor:
    """Mean and standard deviation of each clip's merged visual tokens: (len(clips), 2 * width)."""
    batch = video_processor(videos=clips, do_sample_frames=False, return_tensors="pt")
    tokens = visual(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"]).pooler_output
    merge = visual.spatial_merge_size**2
    sizes = (batch["video_grid_thw"].prod(-1) // merge).tolist()
    return torch.stack([torch.cat([t.mean(0), t.std(0)]) for t in torch.split(tokens, sizes)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a Qwen2-VL or Qwen2.5-VL model directory")
    parser.add_argument("--data", type=Path, required=True, help="practice set folder (train/val/test CSVs)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=float, default=0.7, help="crop side as a share of the frame's")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    video_processor = AutoProcessor.from_pretrained(args.model).video_processor
    visual = model.model.visual
    head = torch.nn.Linear(2 * model.config.text_config.hidden_size, 1)  # the merger outputs the LM width
    optimizer = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.0)

    splits = {name: read_scores(args.data / f"{name}.csv") for name in ("train", "val", "test")}
    videos = {file: read_frames(args.data / file, list(range(probe(args.data / file).num_frames)))
              for scores in splits.values() for file in scores}
    train = list(splits["train"].items())
    mean, std = np.mean([s for _, s in train]), np.std([s for _, s in train]) + 1e-6

    def evaluate() -> dict[str, float]:
        visual.eval()
        with torch.no_grad():
            result = {}
            for name, scores in splits.items():
                pred = [head(pooled(visual, video_processor, [videos[f][uniform_indices(len(videos[f]), 4)]])).item()
                        for f in scores]
                result[name] = round(float(stats.spearmanr(pred, list(scores.values()))[0]), 3)
        visual.train()
        return result

    losses = []
    for step in range(1, args.steps + 1):
        clips, targets = [], []
        for i in rng.integers(len(train), size=args.batch):
            file, score = train[i]
            frames = videos[file]
            t = rng.integers(len(frames) - 1)
            h, w = frames.shape[1:3]
            ch, cw = int(h * args.crop), int(w * args.crop)
            y, x = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
            clips.append(frames[t:t + 2, y:y + ch, x:x + cw])
            targets.append((score - mean) / std)
        loss = F.mse_loss(head(pooled(visual, video_processor, clips)).squeeze(-1), torch.tensor(targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            print(f"step {step}: loss {np.mean(losses[-args.eval_every:]):.3f} (1 = predicting the mean), "
                  f"SROCC {evaluate()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

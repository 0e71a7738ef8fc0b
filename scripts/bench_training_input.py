"""Training-input throughput: samples per second the data pipeline sustains in one worker.

    HF_HUB_OFFLINE=1 python scripts/bench_training_input.py [--samples 40] [--work /tmp/qalign_bench] [--out FILE]

One sample = what a DataLoader worker does per training example: 8 random frames of a 5 s 720x1280
H.264 clip read with the toolkit's reader, one shared random crop (0.9) and a random reverse
(``ClipDataset.__getitem__``), then the collator's processor call (``QualityCollator``: chat template,
Qwen2.5-VL video processor at its default sizes, labels). Stages are timed separately, in one
process, so the numbers are per worker; a DataLoader with N workers scales them by up to N cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np

CLIP = "sandwich_5s_720x1280_h264"


def make_clip(work: Path) -> Path:
    """``bench_video.py``'s 5 s 720x1280 sandwich clip (only this one; kept in ``work`` between runs)."""
    import bench_video  # a sibling script: scripts/ is sys.path[0] when this one runs
    path = work / f"{CLIP}.mp4"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        bench_video._ffmpeg(bench_video.CLIPS[CLIP], path)
    return path


def real_size_processor(workdir: Path):
    """Qwen2.5-VL's processor with its default image/video sizes around the tiny offline tokenizer."""
    import make_tiny_models  # a sibling script: scripts/ is sys.path[0] when this one runs
    from transformers import AutoProcessor, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tiny = AutoProcessor.from_pretrained(make_tiny_models.build_tiny_model("qwen2_5_vl", workdir))
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(),
                               video_processor=Qwen2VLVideoProcessor(cap_pixels_per_frame=True),
                               tokenizer=tiny.tokenizer, chat_template=tiny.tokenizer.chat_template)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=40, help="training examples timed per stage")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "qalign_bench")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    from qalign_kvq.families import get_family
    from qalign_kvq.training.collator import QualityCollator
    from qalign_kvq.training.dataset import ClipDataset

    clip_path = make_clip(args.work)
    table = datasets.Dataset.from_list([
        {"path": str(clip_path), "filename": clip_path.name, "level_word": "good", "level_score": 4.0, "score": 4.0}
    ] * args.samples)
    dataset = ClipDataset(table, num_frames=8, train=True, seed=0, crop_ratio=0.9, reverse_prob=0.5)
    dataset[0]  # probe once (cached per path), as a worker does on its first item
    collator = QualityCollator(get_family("qwen2_5_vl"), real_size_processor(args.work / "models"))

    t0 = time.perf_counter()
    items = [dataset[i] for i in range(args.samples)]
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens = [int(collator([item])["input_ids"].shape[1]) for item in items]
    t_collate = time.perf_counter() - t0
    result = {
        "clip": "5 s 720x1280 H.264 (sandwich layout), 8 random frames, crop 0.9",
        "samples": args.samples,
        "read_augment_samples_per_s": args.samples / t_read,
        "collate_samples_per_s": args.samples / t_collate,
        "pipeline_samples_per_s": args.samples / (t_read + t_collate),
        "tokens_per_sample": int(np.median(tokens)),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"\nper worker: read+augment {result['read_augment_samples_per_s']:.2f}/s, "
          f"processor {result['collate_samples_per_s']:.2f}/s, "
          f"pipeline {result['pipeline_samples_per_s']:.2f} samples/s "
          f"({result['tokens_per_sample']} tokens per sample)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

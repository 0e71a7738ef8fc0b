"""Padding share of training batches: a plain shuffle (the Trainer's random sampler) against the
grouped batch sampler (``group_by_length``, ``source_group_size`` and both), on a practice set.

    HF_HUB_OFFLINE=1 python scripts/bench_padding.py [--sources 16] [--frames 24] [--batch-size 4] [--out FILE]

The practice set (``scripts/make_demo_data.py``, built into ``--work`` unless ``--data`` names one)
has videos of several sizes: 180x320 canvases and their versions down-scaled to 1/2 or 1/3. Its
sources come from ``python -m qalign_kvq.sources``' grouping. Every training row is read as the
Trainer reads it (``ClipDataset``: 8 random frames, crop 0.9) and batched by each sampler's epoch-0
batches; the padding share is measured on the collator's output (``QualityCollator`` with
Qwen2.5-VL's processor sized as its hub checkpoint loads it, see :func:`hub_size_processor`):
padding tokens / all token slots, also what the sampler predicts from the processor's token
counts, and the homologous pairs in the batches.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def practice_set(args) -> Path:
    import make_demo_data  # a sibling script: scripts/ is sys.path[0] when this one runs

    if args.data:
        return args.data
    out = args.work / f"demo_{args.sources}_{args.frames}"
    if not (out / "train.csv").is_file():
        make_demo_data.build(out, num_sources=args.sources, seed=0, num_frames=args.frames)
    return out


def hub_size_processor(workdir: Path):
    """Qwen2.5-VL's processor as ``Qwen/Qwen2.5-VL-7B-Instruct`` loads it (around the tiny offline
    tokenizer): its repo has no video_preprocessor_config.json, so the video processor takes
    preprocessor_config.json's min_pixels 3136 and max_pixels 12845056 (docs: ENVIRONMENT facts);
    small frames stay small, so clip sizes give different token counts."""
    import make_tiny_models
    from transformers import AutoProcessor, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": 3136, "longest_edge": 12845056}
    tiny = AutoProcessor.from_pretrained(make_tiny_models.build_tiny_model("qwen2_5_vl", workdir))
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(size=size),
                               video_processor=Qwen2VLVideoProcessor(size=size),
                               tokenizer=tiny.tokenizer, chat_template=tiny.tokenizer.chat_template)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="a practice set folder (default: build one in --work)")
    parser.add_argument("--sources", type=int, default=16, help="sources of the practice set built")
    parser.add_argument("--frames", type=int, default=24, help="frames per video of the practice set built")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=2, help="versions of one source per batch")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "qalign_bench")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    from qalign_kvq.annotations import add_levels, read_table
    from qalign_kvq.families import get_family
    from qalign_kvq.levels import LevelScale
    from qalign_kvq.sources import group_videos
    from qalign_kvq.training.batching import GroupedBatchSampler, clip_token_lengths, padding_share, random_batches
    from qalign_kvq.training.collator import QualityCollator
    from qalign_kvq.training.dataset import ClipDataset

    root = practice_set(args)
    table = read_table(root / "train.csv", root)
    table = add_levels(table, LevelScale.from_scores(table["score"]))
    sources = group_videos(table["filename"], table["path"]).source_names()
    family, processor = get_family("qwen2_5_vl"), hub_size_processor(args.work / "models")
    lengths = clip_token_lengths(table, family, processor, num_frames=8, crop_ratio=0.9)
    dataset = ClipDataset(table, num_frames=8, train=True, seed=0, crop_ratio=0.9)
    items = [dataset[i] for i in range(len(dataset))]
    collator = QualityCollator(family, processor)

    n, b, g = len(table), args.batch_size, args.group_size
    variants = {
        "shuffle": random_batches(n, b, seed=0),
        "group_by_length": GroupedBatchSampler(n, b, lengths=lengths).all_batches(0),
        "source_group_size": GroupedBatchSampler(n, b, sources=sources, group_size=g).all_batches(0),
        "both": GroupedBatchSampler(n, b, sources=sources, group_size=g, lengths=lengths).all_batches(0),
    }
    results = {}
    for name, batches in variants.items():
        real = slots = 0
        for batch in batches:
            mask = collator([items[i] for i in batch])["attention_mask"]
            real, slots = real + int(mask.sum()), slots + mask.numel()
        pairs = sum(sum(c * (c - 1) // 2 for c in np.unique([sources[i] for i in batch], return_counts=True)[1])
                    for batch in batches)
        results[name] = {"batches": len(batches), "padding_share": 1 - real / slots,
                         "predicted_padding_share": padding_share(batches, lengths), "token_slots": slots,
                         "homologous_pairs": int(pairs)}
    report = {"data": str(root), "rows": n, "sources": len(set(sources)), "batch_size": b, "group_size": g,
              "distinct_lengths": sorted(set(lengths)), "results": results}
    print(f"{n} training rows of {root}, {len(set(sources))} sources, token lengths {sorted(set(lengths))}")
    print(f"{'batches':>20} {'padding':>8} {'predicted':>9} {'token slots':>11} {'homologous pairs':>16}")
    for name, r in results.items():
        print(f"{name:>20} {100 * r['padding_share']:7.1f}% {100 * r['predicted_padding_share']:8.1f}% "
              f"{r['token_slots']:>11} {r['homologous_pairs']:>16}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

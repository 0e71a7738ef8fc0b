"""Video input: probing and reading frames, frame sampling, clip augmentation, scoring views,
sandwich detection and typed errors."""

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

__all__ = [
    "EmptyVideoError",
    "NoVideoStreamError",
    "NotAVideoError",
    "VideoDecodeError",
    "VideoError",
    "VideoInfo",
    "VideoNotFoundError",
    "per_second_indices",
    "probe",
    "random_indices",
    "read_frames",
    "uniform_indices",
]

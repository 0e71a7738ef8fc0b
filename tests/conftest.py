"""Shared fixtures. Area-specific fixtures live in tests/fixtures_*.py and are loaded here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.fixtures_video", "tests.fixtures_models"]

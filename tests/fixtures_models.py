"""Fixtures for tiny offline models (owned by the model-family work).

Models come from ``scripts/make_tiny_models.py`` and are built lazily, once per test session and
family, into a session temp directory (a few seconds each, ~1 MB).

* ``tiny_models``: a function ``tiny_models(family) -> Path`` returning the model directory::

      def test_x(tiny_models):
          path = tiny_models("qwen2_5_vl")
          model, processor = get_family("qwen2_5_vl").load(str(path))

* ``tiny_model_dir``: the directory of one family, chosen by indirect parametrisation::

      @pytest.mark.parametrize("tiny_model_dir", ["qwen2_vl", "internvl"], indirect=True)
      def test_y(tiny_model_dir):
          ...  # tiny_model_dir.name is the family name

* ``TINY_FAMILIES``: every family that has a tiny model (all of ``qalign_kvq.families.FAMILY_NAMES``).
* ``load_builder()``: the ``scripts/make_tiny_models.py`` module (for ``build_tiny_model``).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from qalign_kvq.families import FAMILY_NAMES

ROOT = Path(__file__).resolve().parents[1]
TINY_FAMILIES = tuple(FAMILY_NAMES)


def load_builder():
    """Import ``scripts/make_tiny_models.py`` as a module."""
    import make_tiny_models  # scripts/ is on pytest's pythonpath

    return make_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``tiny_models(family) -> Path``: the tiny model of ``family``, built on first use."""
    root = tmp_path_factory.mktemp("tiny_models")
    builder = load_builder()
    built: dict[str, Path] = {}
    lock = threading.Lock()

    def get(family: str) -> Path:
        with lock:
            if family not in built:
                built[family] = builder.build_tiny_model(family, root)
            return built[family]

    return get


@pytest.fixture
def tiny_model_dir(request, tiny_models) -> Path:
    """The tiny model directory of the family given by indirect parametrisation."""
    family = getattr(request, "param", None)
    if family is None:
        raise pytest.UsageError("tiny_model_dir needs a family: parametrize it with indirect=True")
    return tiny_models(family)

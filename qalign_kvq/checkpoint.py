"""The small JSON that makes a model directory a qalign-kvq checkpoint: what scoring needs."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qalign_kvq.families.base import ANSWER_PREFIX, DEFAULT_QUESTION
from qalign_kvq.levels import LEVEL_WORDS, NOMINAL_RANGE, LevelScale, check_vocabulary

META_FILE = "qalign_kvq.json"
FORMAT_VERSION = 1


@dataclass
class CheckpointMeta:
    """Everything scoring needs besides weights and processor, stored as ``qalign_kvq.json``."""

    family: str
    mos_low: float = NOMINAL_RANGE[0]
    mos_high: float = NOMINAL_RANGE[1]
    level_words: list[str] = field(default_factory=lambda: list(LEVEL_WORDS))
    #: The score of each level word, best first (None: equally spaced from 5 down to 1).
    level_scores: list[float] | None = None
    question: str = DEFAULT_QUESTION
    answer_prefix: str = ANSWER_PREFIX
    #: Frames per clip and views used when the model was trained (scoring defaults follow them).
    train_frames: int = 8
    #: Base model id/path when the directory holds a peft adapter instead of full weights.
    base_model: str | None = None
    #: Affine map ``mos = a * score + b`` fitted by ``infer --calibrate`` (None: use the level range).
    calibration: dict[str, float] | None = None
    #: Evaluation results of the run (SROCC, PLCC, Rank1, Rank2, Final), for the model card.
    metrics: dict[str, float] | None = None
    #: Free-form description of the run (recipe name, base model, dataset), for the model card.
    recipe: dict[str, Any] | None = None
    #: Constructor options of the family (``get_family(family, **family_options)``), e.g.
    #: ``{"prompt_layout": "question_first"}``: training and scoring build the family alike.
    family_options: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        check_vocabulary(self.level_words, self.level_scores)

    @property
    def scores(self) -> tuple[float, ...]:
        """The level scores, best first (:func:`qalign_kvq.levels.default_scores` unless stored)."""
        return tuple(float(v) for v in check_vocabulary(self.level_words, self.level_scores)[1])

    @property
    def scale(self) -> LevelScale:
        return LevelScale(self.mos_low, self.mos_high, self.scores)

    @property
    def bin_edges(self) -> list[float]:
        return [float(e) for e in self.scale.edges]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``qalign_kvq.json`` atomically into ``directory``."""
        path = Path(directory) / META_FILE
        data = asdict(self)
        data["bin_edges"] = self.bin_edges
        write_json_atomic(path, data)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> CheckpointMeta:
        path = Path(directory) / META_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: not a qalign-kvq checkpoint (no {META_FILE})")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON ({err})") from err
        data.pop("bin_edges", None)
        if data.get("family_options") is None:  # written before the field existed
            data.pop("family_options", None)
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown fields {sorted(unknown)}")
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

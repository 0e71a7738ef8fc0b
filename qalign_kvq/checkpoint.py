"""The small JSON that makes a model directory a qalign-kvq checkpoint: what scoring needs."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qalign_kvq.families.base import ANSWER_PREFIX, DEFAULT_QUESTION
from qalign_kvq.levels import LEVEL_WORDS, NOMINAL_RANGE, LevelScale, check_vocabulary

META_FILE = "qalign_kvq.json"
#: 2: ``family_options`` hold every option the family was built with (frame budget included),
#: ``protocol`` and ``base_revision`` exist. Version-1 files load with the defaults they had then.
FORMAT_VERSION = 2


@dataclass
class CheckpointMeta:
    """Everything scoring needs besides weights and processor, stored as ``qalign_kvq.json``."""

    family: str
    mos_low: float = NOMINAL_RANGE[0]
    mos_high: float = NOMINAL_RANGE[1]
    level_words: list[str] = field(default_factory=lambda: list(LEVEL_WORDS))
    #: The score of each level word, best first (None: equally spaced from 5 down to 1).
    level_scores: list[float] | None = None
    #: The question and the answer prefix of the prompts, as worded for videos (images say
    #: "image" where these say "video", see ``families.base.for_media``).
    question: str = DEFAULT_QUESTION
    answer_prefix: str = ANSWER_PREFIX
    #: Frames per training clip (a record of the run: scoring takes its frames from ``protocol``).
    train_frames: int = 8
    #: Base model id/path when the directory holds a peft adapter instead of full weights.
    base_model: str | None = None
    #: The Hub commit of ``base_model`` that training loaded (None for a local base): an adapter is
    #: applied to exactly those weights.
    base_revision: str | None = None
    #: The scoring protocol (``qalign_kvq.scoring.PROTOCOLS``): ``kvq`` (12 frames x FiveCrop, MOS
    #: scale) for fine-tuned models, ``authors`` for public checkpoints scored their authors' way.
    protocol: str = "kvq"
    #: Affine map ``mos = a * score + b`` fitted by ``infer --calibrate`` (None: use the level range).
    calibration: dict[str, float] | None = None
    #: Evaluation results of the run (SROCC, PLCC, Rank1, Rank2, Final), for the model card.
    metrics: dict[str, float] | None = None
    #: Free-form description of the run (recipe name, base model, dataset), for the model card.
    recipe: dict[str, Any] | None = None
    #: Constructor options of the family (``get_family(family, **family_options)``), e.g.
    #: ``{"prompt_layout": "vicuna_v1", "frame_pixels": 200704}``: training and scoring build the
    #: family alike, with the same per-frame pixel budget.
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
    """Write JSON to a temporary file beside ``path`` and rename it over ``path`` (the file gets the
    umask's mode, like any output: ``mkstemp`` would make it readable by its owner only)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""Torch datasets of clips for training (random frames + shared crop + random reverse, seeded per
epoch and index) and for validation (frames at equal intervals, no augmentation)."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np
import torch
from transformers import TrainerCallback

from qalign_kvq.families.base import DEFAULT_QUESTION, QUESTIONS, ClipTiming


class ClipDataset(torch.utils.data.Dataset):
    """Rows of an annotation table (columns ``path``, ``filename``, ``level_word``, ``level_score``,
    ``score`` and optionally ``soft_label``) as clip examples.

    With ``train=True`` each item draws ``num_frames`` random frames, one crop of ``crop_ratio``
    shared by every frame, a random reverse and a question paraphrase, all from a generator seeded
    by ``(seed, epoch, index)``: the same epoch and index give the same clip, so runs and resumed
    runs see identical data. With ``train=False`` the frames are evenly spaced and the question is
    the first one. Each item carries the clip's ``timing`` (its frames' indices and the video's
    rate, mirrored for a reversed clip) for the families that read frame times."""

    def __init__(self, table: datasets.Dataset, num_frames: int = 8, train: bool = True, seed: int = 0,
                 crop_ratio: float = 0.9, reverse_prob: float = 0.5,
                 questions: Sequence[str] = QUESTIONS):
        self.rows = table.to_list()
        self.num_frames = num_frames
        self.train = train
        self.seed = seed
        self.crop_ratio = crop_ratio
        self.reverse_prob = reverse_prob
        self.questions = list(questions) if train else [questions[0] if questions else DEFAULT_QUESTION]
        self.epoch = 0
        self._videos: dict[str, tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _video(self, path: str) -> tuple[int, float]:
        """``(frame count, fps)`` of a video, probed once."""
        from qalign_kvq.video import probe

        if path not in self._videos:
            info = probe(path)
            self._videos[path] = (info.num_frames, info.fps)
        return self._videos[path]

    def __getitem__(self, index: int) -> dict:
        from qalign_kvq.video import augment_clip_reversed, random_indices, read_frames, uniform_indices

        row = self.rows[index]
        count, fps = self._video(row["path"])
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            indices = random_indices(count, self.num_frames, rng)
            clip = read_frames(row["path"], indices)
            clip, reversed_ = augment_clip_reversed(clip, rng, crop_ratio=self.crop_ratio,
                                                    reverse_prob=self.reverse_prob)
            question = self.questions[int(rng.integers(len(self.questions)))]
        else:
            indices, reversed_ = uniform_indices(count, self.num_frames), False
            clip = read_frames(row["path"], indices)
            question = self.questions[0]
        timing = ClipTiming(tuple(indices), fps, count) if fps > 0 else None
        if timing is not None and reversed_:
            timing = timing.reversed()
        item = {
            "clip": np.ascontiguousarray(clip),
            "question": question,
            "level_word": row["level_word"],
            "level_score": float(row["level_score"]),
            "mos": float(row["score"]),
            "index": index,
            "timing": timing,
        }
        if "soft_label" in row:
            item["soft_label"] = np.asarray(row["soft_label"], dtype=np.float32)
        return item


class EpochCallback(TrainerCallback):
    """Tells a :class:`ClipDataset` which epoch begins (also after resuming mid-epoch), so that the
    augmentation draws depend on the epoch and not on how many items a process has read."""

    def __init__(self, dataset: ClipDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(np.floor((state.epoch or 0.0) + 1e-6)))

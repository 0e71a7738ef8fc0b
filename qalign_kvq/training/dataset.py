"""Torch datasets of clips for training (random frames + shared crop + random reverse, seeded per
epoch and index) and for validation (frames at equal intervals, no augmentation)."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np
import torch
from transformers import TrainerCallback

from qalign_kvq.families.base import DEFAULT_QUESTION, QUESTIONS


class ClipDataset(torch.utils.data.Dataset):
    """Rows of an annotation table (columns ``path``, ``filename``, ``level_word``, ``level_score``,
    ``score`` and optionally ``soft_label`` and ``source``) as clip examples (a source becomes an
    integer ``source_id``, numbered in sorted order).

    With ``train=True`` each item draws ``num_frames`` random frames, one crop of ``crop_ratio``
    shared by every frame, a random reverse and a question paraphrase, all from a generator seeded
    by ``(seed, epoch, index)``: the same epoch and index give the same clip, so runs and resumed
    runs see identical data. With ``train=False`` the frames are evenly spaced and the question is
    the first one."""

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
        sources = sorted({row["source"] for row in self.rows}) if "source" in table.column_names else []
        self.source_ids = {name: i for i, name in enumerate(sources)}
        self._frame_counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _frame_count(self, path: str) -> int:
        from qalign_kvq.video import probe

        if path not in self._frame_counts:
            self._frame_counts[path] = probe(path).num_frames
        return self._frame_counts[path]

    def __getitem__(self, index: int) -> dict:
        from qalign_kvq.video import augment_clip, random_indices, read_frames, uniform_indices

        row = self.rows[index]
        count = self._frame_count(row["path"])
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            indices = random_indices(count, self.num_frames, rng)
            clip = read_frames(row["path"], indices)
            clip = augment_clip(clip, rng, crop_ratio=self.crop_ratio, reverse_prob=self.reverse_prob)
            question = self.questions[int(rng.integers(len(self.questions)))]
        else:
            clip = read_frames(row["path"], uniform_indices(count, self.num_frames))
            question = self.questions[0]
        item = {
            "clip": np.ascontiguousarray(clip),
            "question": question,
            "level_word": row["level_word"],
            "level_score": float(row["level_score"]),
            "mos": float(row["score"]),
            "index": index,
        }
        if self.source_ids:
            item["source_id"] = self.source_ids[row["source"]]
        if "soft_label" in row:
            item["soft_label"] = np.asarray(row["soft_label"], dtype=np.float32)
        return item


class EpochCallback(TrainerCallback):
    """Tells a :class:`ClipDataset` (and a batch sampler with ``set_epoch``) which epoch begins, also
    after resuming mid-epoch, so that the augmentation draws and the batches depend on the epoch and
    not on how many items a process has read."""

    def __init__(self, dataset: ClipDataset, sampler=None):
        self.dataset = dataset
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = int(np.floor((state.epoch or 0.0) + 1e-6))
        self.dataset.set_epoch(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

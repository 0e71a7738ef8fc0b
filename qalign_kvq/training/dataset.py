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
    ``score`` and optionally ``soft_label`` and ``source``) as clip examples (a source becomes an
    integer ``source_id``, numbered in sorted order).

    With ``train=True`` each item draws ``num_frames`` random frames, one crop of ``crop_ratio``
    shared by every frame, a random reverse and a question paraphrase, all from a generator seeded
    by ``(seed, epoch, index)``: the same epoch and index give the same clip, so runs and resumed
    runs see identical data. With ``train=False`` the frames are evenly spaced and the question is
    the first one. Each item carries the clip's ``timing`` (its frames' indices and the video's
    rate, mirrored for a reversed clip) for the families that read frame times.

    The epoch and the videos' frame counts and rates live in shared memory, so DataLoader workers
    (forked once, or kept with ``persistent_workers``) see each new epoch and probe each video once
    for all workers and epochs; ``probed`` (path -> (frames, fps), e.g. from ``check_videos``) fills
    the cache ahead."""

    def __init__(self, table: datasets.Dataset, num_frames: int = 8, train: bool = True, seed: int = 0,
                 crop_ratio: float = 0.9, reverse_prob: float = 0.5,
                 questions: Sequence[str] = QUESTIONS, probed: dict[str, tuple[int, float]] | None = None):
        self.rows = table.to_list()
        self.num_frames = num_frames
        self.train = train
        self.seed = seed
        self.crop_ratio = crop_ratio
        self.reverse_prob = reverse_prob
        self.questions = list(questions) if train else [questions[0] if questions else DEFAULT_QUESTION]
        sources = sorted({row["source"] for row in self.rows}) if "source" in table.column_names else []
        self.source_ids = {name: i for i, name in enumerate(sources)}
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._path_ids = {path: i for i, path in enumerate(dict.fromkeys(row["path"] for row in self.rows))}
        known = probed or {}
        self._frame_counts = torch.tensor([known.get(path, (-1, 0.0))[0] for path in self._path_ids],
                                          dtype=torch.int64).share_memory_()  # -1: not probed yet
        self._fps = torch.tensor([known.get(path, (-1, 0.0))[1] for path in self._path_ids],
                                 dtype=torch.float64).share_memory_()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def _video(self, path: str) -> tuple[int, float]:
        """``(frame count, fps)`` of a video, probed once."""
        from qalign_kvq.video import probe

        slot = self._path_ids[path]
        count, fps = int(self._frame_counts[slot]), float(self._fps[slot])
        if count < 0:
            info = probe(path)
            count, fps = info.num_frames, info.fps
            self._fps[slot] = fps
            self._frame_counts[slot] = count  # written last: a count >= 0 means both are there
        return count, fps

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

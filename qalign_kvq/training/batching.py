"""Training batches that keep versions of one source together and/or clips of one token length
together, every row exactly once per epoch, and the padding they leave.

:class:`GroupedBatchSampler` is the Trainer's train batch sampler when either grouping is asked:

* ``group_size`` (homologous grouping): rows of one source are shuffled and cut into units of
  ``group_size`` versions; full units fill batches first (``group_size`` divides the batch size, so
  each of those batches holds ``batch_size / group_size`` sources with ``group_size`` versions
  each), the sources' remainders follow, still side by side.
* ``lengths`` (length grouping): rows are first split into pools of one token length (one clip
  shape), each pool is batched on its own, and what is left of each pool (fewer than a batch) is
  batched with its neighbours in length. Only those few left-over batches carry padding.

Both together: the units are built inside each length pool, so a batch is homologous *and* of one
length where the set allows; a set where no two versions of a source share a length is refused.
Batch order is shuffled. Everything is drawn from ``(seed, epoch)``: the same epoch gives the same
batches, also after resuming. With ``num_replicas`` processes each gets every ``num_replicas``-th
batch; the count is made a multiple of ``num_replicas`` by halving the largest batches (no row is
repeated or dropped) or, with ``drop_last``, by dropping the last ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class GroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of row indices of a training table (see the module docstring). It has no
    ``batch_size`` attribute on purpose: accelerate's shard wrapper then passes batches of any size
    through (the Trainer makes it a pass-through; this sampler already yields one process's share)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int = 0, sources: Sequence | None = None,
                 group_size: int = 0, lengths: Sequence[int] | None = None, drop_last: bool = False,
                 num_replicas: int = 1, rank: int = 0):
        if batch_size < 1 or num_rows < 1:
            raise ValueError(f"need rows and a batch size >= 1, got {num_rows} rows and batch size {batch_size}")
        if group_size:
            if sources is None:
                raise ValueError("source_group_size needs a source column in the training table "
                                 "(python -m qalign_kvq.sources writes one)")
            if group_size < 2 or batch_size % group_size:
                raise ValueError(f"source_group_size ({group_size}) must be >= 2 and divide the per-device batch "
                                 f"size ({batch_size}): each batch holds whole groups of versions of one source")
        for name, values in (("sources", sources), ("lengths", lengths)):
            if values is not None and len(values) != num_rows:
                raise ValueError(f"{len(values)} {name} for {num_rows} rows")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.num_rows, self.rows_per_batch, self.seed = num_rows, batch_size, seed
        self.group_size = group_size
        self.sources = None if sources is None else np.unique(np.asarray(sources, dtype=str), return_inverse=True)[1]
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.drop_last, self.num_replicas, self.rank = drop_last, num_replicas, rank
        self.epoch = 0
        if group_size and self.lengths is not None and not self._pairable_within_lengths():
            raise ValueError("source_group_size with train_sampling_strategy=group_by_length: no two versions of a "
                             "source have the same token length here, so no batch could hold a homologous pair; "
                             "use one of the two")
        if len(self.all_batches(0)) < num_replicas:
            raise ValueError(f"{num_rows} rows make fewer batches of {batch_size} than the {num_replicas} processes")

    def _pairable_within_lengths(self) -> bool:
        keys = self.sources * (self.lengths.max() + 1) + self.lengths
        return bool((np.unique(keys, return_counts=True)[1] > 1).any())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ----- building --------------------------------------------------------------------------
    def _pool_order(self, rows: np.ndarray, rng: np.random.Generator) -> list[int]:
        """One pool's rows in batch order: homologous units (full ones first) or a plain shuffle."""
        rows = rng.permutation(rows)
        if not self.group_size:
            return rows.tolist()
        full, partial = [], []
        for source in np.unique(self.sources[rows]):
            members = rows[self.sources[rows] == source]
            cut = len(members) - len(members) % self.group_size
            full += [members[k:k + self.group_size].tolist() for k in range(0, cut, self.group_size)]
            if cut < len(members):
                partial.append(members[cut:].tolist())
        order = [row for k in rng.permutation(len(full)) for row in full[k]]
        return order + [row for k in rng.permutation(len(partial)) for row in partial[k]]

    def all_batches(self, epoch: int) -> list[list[int]]:
        """Every process's batches of ``epoch`` in global order (process ``r`` takes ``r::num_replicas``)."""
        rng = np.random.default_rng([self.seed, epoch])
        rows = np.arange(self.num_rows)
        if self.lengths is None:
            pools = [rows]
        else:
            pools = [rows[self.lengths == value] for value in np.unique(self.lengths)]  # ascending length
        batches, leftover = [], []
        for pool in pools:
            order = self._pool_order(pool, rng)
            cut = len(order) - len(order) % self.rows_per_batch
            batches += [order[k:k + self.rows_per_batch] for k in range(0, cut, self.rows_per_batch)]
            leftover += order[cut:]
        batches += [leftover[k:k + self.rows_per_batch] for k in range(0, len(leftover), self.rows_per_batch)]
        batches = [batches[k] for k in rng.permutation(len(batches))]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.rows_per_batch]
            return batches[: len(batches) - len(batches) % self.num_replicas]
        while len(batches) % self.num_replicas and any(len(b) > 1 for b in batches):
            k = max(range(len(batches)), key=lambda n: len(batches[n]))
            half = _split_point(len(batches[k]), self.group_size)
            batches[k:k + 1] = [batches[k][:half], batches[k][half:]]
        if len(batches) % self.num_replicas:
            raise ValueError(f"{self.num_rows} rows cannot be spread evenly over {self.num_replicas} processes")
        return batches

    def __iter__(self):
        yield from self.all_batches(self.epoch)[self.rank::self.num_replicas]

    def __len__(self) -> int:
        return len(self.all_batches(self.epoch)) // self.num_replicas

    # ----- what the batches hold ---------------------------------------------------------------
    def homologous_pairs(self, epoch: int = 0) -> int:
        """Pairs of rows of one source that share a batch in ``epoch`` (0 without sources)."""
        if self.sources is None:
            return 0
        total = 0
        for batch in self.all_batches(epoch):
            counts = np.unique(self.sources[batch], return_counts=True)[1]
            total += int((counts * (counts - 1) // 2).sum())
        return total

    def padding_share(self, epoch: int = 0) -> float | None:
        """Share of the padded token slots that are padding in ``epoch``'s batches (None without lengths)."""
        return None if self.lengths is None else padding_share(self.all_batches(epoch), self.lengths)


def _split_point(size: int, group_size: int) -> int:
    """Where to halve a batch: at a unit boundary when the batch holds two units or more."""
    if group_size and size >= 2 * group_size:
        return (size // group_size // 2) * group_size
    return size // 2


def padding_share(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """``1 - real tokens / (rows x longest row)`` summed over the batches (right padding to the longest)."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[list(b)].sum()) for b in batches)
    padded = sum(len(b) * int(lengths[list(b)].max()) for b in batches if len(b))
    return 1.0 - real / padded if padded else 0.0


def random_batches(num_rows: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """Batches of a plain shuffle (what the Trainer's random sampler gives), for comparisons."""
    order = np.random.default_rng(seed).permutation(num_rows).tolist()
    return [order[k:k + batch_size] for k in range(0, num_rows, batch_size)]


def clip_token_lengths(table, family, processor, num_frames: int, crop_ratio: float = 1.0,
                       question: str | None = None) -> list[int]:
    """Tokens of each training row's input as the collator builds it: the row's video size (probed),
    cut by the training crop, ``num_frames`` frames, its level word and ``question`` (default: the
    default question; paraphrases differ by a few tokens). The processor runs once per distinct
    (size, level word) on blank frames of that size."""
    from qalign_kvq.families.base import DEFAULT_QUESTION
    from qalign_kvq.video import probe

    question = question or DEFAULT_QUESTION
    cache: dict[tuple[int, int, str], int] = {}
    out = []
    for path, word in zip(table["path"], table["level_word"]):
        info = probe(path)
        h, w = info.height, info.width
        if crop_ratio != 1.0:
            h, w = max(1, round(h * crop_ratio)), max(1, round(w * crop_ratio))
        key = (h, w, word)
        if key not in cache:
            blank = np.zeros((num_frames, h, w, 3), dtype=np.uint8)
            inputs = family.build_inputs(processor, [blank], [question], level_words=[word], padding_side="right")
            cache[key] = int(inputs.batch["attention_mask"].sum())
        out.append(cache[key])
    return out


def describe(sampler: GroupedBatchSampler, epoch: int = 0) -> str:
    """One log line: batches, homologous pairs and padding share (with a plain shuffle's for comparison)."""
    batches = sampler.all_batches(epoch)
    parts = [f"{len(batches)} batches of up to {sampler.rows_per_batch} over {sampler.num_replicas} process(es)"]
    if sampler.sources is not None:
        parts.append(f"{sampler.homologous_pairs(epoch)} homologous pairs in batches")
    if sampler.lengths is not None:
        shuffled = padding_share(random_batches(sampler.num_rows, sampler.rows_per_batch, sampler.seed), sampler.lengths)
        parts.append(f"padding {100 * sampler.padding_share(epoch):.1f}% of token slots "
                     f"(a plain shuffle: {100 * shuffled:.1f}%)")
    return ", ".join(parts)

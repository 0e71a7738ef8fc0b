"""The grouped train batch sampler: homologous batches, one-length batches, both, every row once per
epoch on every process layout, determinism per (seed, epoch), the padding it leaves."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from qalign_kvq.training.batching import GroupedBatchSampler, padding_share, random_batches

# 5 sources with 7 versions (like KVQ and the practice set), 2 with 3 and one alone: 42 rows.
SOURCES = [f"s{k}" for k in range(5) for _ in range(7)] + ["t0"] * 3 + ["t1"] * 3 + ["u"]


def _rows(batches):
    return sorted(row for batch in batches for row in batch)


def _pairs(batch, sources):
    return sum(c * (c - 1) // 2 for c in Counter(sources[i] for i in batch).values())


@pytest.mark.parametrize("batch_size,group_size", [(4, 2), (6, 3), (8, 4), (4, 4)])
def test_homologous_batches_cover_every_row_once_and_hold_pairs(batch_size, group_size):
    sampler = GroupedBatchSampler(len(SOURCES), batch_size, seed=3, sources=SOURCES, group_size=group_size)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert _rows(batches) == list(range(len(SOURCES)))
        assert len(batches) == len(sampler) == -(-len(SOURCES) // batch_size)
        # batches made of whole units: each source in them has a multiple of group_size versions
        full_units = sum(c // group_size for c in Counter(SOURCES).values())
        whole = [b for b in batches if len(b) == batch_size
                 and all(c % group_size == 0 for c in Counter(SOURCES[i] for i in b).values())]
        assert len(whole) >= full_units // (batch_size // group_size) - 1
        pairs = sum(_pairs(b, SOURCES) for b in batches)
        assert pairs == sampler.homologous_pairs(epoch) >= full_units * group_size * (group_size - 1) // 2
    # a plain shuffle puts few versions of a source together
    shuffled = sum(_pairs(b, SOURCES) for b in random_batches(len(SOURCES), batch_size, seed=3))
    assert shuffled < sampler.homologous_pairs(0) / 2


def test_batches_are_deterministic_per_seed_and_epoch():
    a = GroupedBatchSampler(len(SOURCES), 4, seed=1, sources=SOURCES, group_size=2)
    b = GroupedBatchSampler(len(SOURCES), 4, seed=1, sources=SOURCES, group_size=2)
    assert a.all_batches(0) == b.all_batches(0) and a.all_batches(5) == b.all_batches(5)
    assert a.all_batches(0) != a.all_batches(1)
    assert a.all_batches(0) != GroupedBatchSampler(len(SOURCES), 4, seed=2, sources=SOURCES,
                                                  group_size=2).all_batches(0)
    b.set_epoch(5)
    assert list(b) == a.all_batches(5)


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_each_process_gets_its_share_and_together_every_row_once(replicas):
    # 42 rows in batches of 4: 11 batches, not a multiple of 2, 3 or 4: the largest are halved
    shares = [list(GroupedBatchSampler(len(SOURCES), 4, seed=0, sources=SOURCES, group_size=2,
                                       num_replicas=replicas, rank=r)) for r in range(replicas)]
    assert len({len(s) for s in shares}) == 1, "every process runs the same number of steps"
    assert _rows([b for s in shares for b in s]) == list(range(len(SOURCES)))
    assert all(len(b) >= 2 for s in shares for b in s)
    dropped = [list(GroupedBatchSampler(len(SOURCES), 4, seed=0, num_replicas=replicas, rank=r, drop_last=True))
               for r in range(replicas)]
    assert len({len(s) for s in dropped}) == 1 and all(len(b) == 4 for s in dropped for b in s)
    assert len(_rows([b for s in dropped for b in s])) == 4 * replicas * (10 // replicas)


def test_length_grouped_batches_have_one_length_and_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.choice([900, 1160, 1450, 2900], size=len(SOURCES)).tolist()
    sampler = GroupedBatchSampler(len(SOURCES), 4, seed=0, lengths=lengths)
    batches = sampler.all_batches(0)
    assert _rows(batches) == list(range(len(SOURCES)))
    mixed = [b for b in batches if len({lengths[i] for i in b}) > 1]
    assert len(mixed) <= 3, "only the left-overs of the 4 lengths share a batch"
    assert sampler.padding_share(0) < 0.5 * padding_share(random_batches(len(SOURCES), 4, 0), lengths)
    # the share is 1 - real / padded slots
    assert padding_share([[0, 1]], [3, 1]) == pytest.approx(1 - 4 / 6)


def test_homologous_and_length_grouping_together():
    # the downscaled version (v5 of 7) of each source has its own, shorter length
    lengths = [700 if k % 7 == 5 else 1400 for k in range(len(SOURCES))]
    sampler = GroupedBatchSampler(len(SOURCES), 4, seed=0, sources=SOURCES, group_size=2, lengths=lengths)
    batches = sampler.all_batches(0)
    assert _rows(batches) == list(range(len(SOURCES)))
    assert sum(len({lengths[i] for i in b}) > 1 for b in batches) <= 1
    one_length = [b for b in batches if len({lengths[i] for i in b}) == 1 and len(b) == 4]
    assert sum(_pairs(b, SOURCES) >= 2 for b in one_length) >= len(one_length) - 2
    assert sampler.padding_share(0) < 0.05
    # no two versions of a source of one length: homologous batches cannot be built
    with pytest.raises(ValueError, match="no two versions of a source have the same token length"):
        GroupedBatchSampler(6, 2, sources=["a", "a", "b", "b", "c", "c"], group_size=2,
                            lengths=[1, 2, 1, 2, 1, 2])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="must be >= 2 and divide the per-device batch size"):
        GroupedBatchSampler(len(SOURCES), 4, sources=SOURCES, group_size=3)
    with pytest.raises(ValueError, match="needs a source column"):
        GroupedBatchSampler(len(SOURCES), 4, group_size=2)
    with pytest.raises(ValueError, match="cannot be spread evenly over 2 processes"):
        GroupedBatchSampler(1, 4, num_replicas=2)
    with pytest.raises(ValueError, match="fewer batches of 4 than the 2 processes"):
        GroupedBatchSampler(7, 4, num_replicas=2, drop_last=True)
    with pytest.raises(ValueError, match="3 sources for 4 rows"):
        GroupedBatchSampler(4, 2, sources=["a", "a", "b"], group_size=2)

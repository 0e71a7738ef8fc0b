"""Pairwise rank losses on the expected level scores of a batch: the Thurstone fidelity loss
(DeQA-Score) and a margin loss, over all in-batch pairs or only homologous ones (two versions of
one source, what KVQ's Rank1 measures). Under torch.distributed the pairs are those of the global
micro-batch (every process's clips of the step), as one process with the whole batch would form
them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

RANK_LOSSES = ("fidelity", "margin")
RANK_PAIRS = ("all", "homologous")


def expected_scores(level_logits: torch.Tensor, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``(B,)`` expected level score of each row: softmax over the level logits times the level values."""
    probs = F.softmax(level_logits.float(), dim=-1)
    return probs @ torch.as_tensor(values, dtype=probs.dtype, device=probs.device)


def pair_indices(n: int, sources: torch.Tensor | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i, j)`` with ``i < j``: every pair of ``n`` rows, or with ``sources`` (``(n,)`` integer ids)
    only the pairs of rows from the same source."""
    i, j = torch.triu_indices(n, n, offset=1, device=device)
    if sources is not None:
        sources = sources.to(i.device)
        keep = sources[i] == sources[j]
        i, j = i[keep], j[keep]
    return i, j


def fidelity_loss(scores: torch.Tensor, truth: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                  eps: float = 1e-8) -> torch.Tensor:
    """Thurstone fidelity loss over pairs: ``P(i > j) = Phi((s_i - s_j) / sqrt(2))``, target 1, 0 or
    0.5 (a tie) from the true scores; the mean over the pairs."""
    p = 0.5 * (1 + torch.erf((scores[i] - scores[j]) / 2.0))  # Phi(d / sqrt(2)) = (1 + erf(d / 2)) / 2
    target = (torch.sign(truth[i] - truth[j]) + 1) / 2
    return (1 - torch.sqrt(target * p + eps) - torch.sqrt((1 - target) * (1 - p) + eps)).mean()


def margin_loss(scores: torch.Tensor, truth: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                margin: float) -> torch.Tensor:
    """``max(0, margin - sign(t_i - t_j) (s_i - s_j))`` averaged over the pairs whose true scores
    differ (ties carry no order): 0 when every pair is ordered right by at least ``margin``."""
    sign = torch.sign(truth[i] - truth[j])
    ordered = sign != 0
    if not bool(ordered.any()):
        return scores.sum() * 0.0
    gaps = sign[ordered] * (scores[i][ordered] - scores[j][ordered])
    return F.relu(margin - gaps).mean()


def rank_loss(level_logits: torch.Tensor, truth: torch.Tensor, values: Sequence[float] | torch.Tensor,
              kind: str = "fidelity", margin: float = 0.5, sources: torch.Tensor | None = None,
              across_processes: bool = True) -> torch.Tensor:
    """The ``kind`` loss (fidelity or margin) between the expected scores of ``level_logits`` and the
    true level scores ``truth`` over the batch's pairs (with ``sources``: homologous pairs only).
    0 (with a gradient path) when the batch has no such pair. With ``across_processes`` (and a
    process group of several), the pairs are formed over all processes' rows; each process's
    gradient flows through its own rows, scaled by the world size, so the average that DDP or
    DeepSpeed takes is the single-process gradient, and the value is the same on every process."""
    if kind not in RANK_LOSSES:
        raise ValueError(f"rank loss must be one of {RANK_LOSSES}, not {kind!r}")
    scores = expected_scores(level_logits, values)
    truth = truth.to(scores.device).float()
    world = _world_size() if across_processes else 1
    if world > 1:
        scores, truth, sources = _gather_batch(scores, truth, sources)
    i, j = pair_indices(scores.shape[0], sources, device=scores.device)
    if i.numel() == 0:
        return scores.sum() * 0.0
    loss = fidelity_loss(scores, truth, i, j) if kind == "fidelity" else margin_loss(scores, truth, i, j, margin)
    return loss + (world - 1) * (loss - loss.detach()) if world > 1 else loss


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_batch(scores: torch.Tensor, truth: torch.Tensor, sources: torch.Tensor | None):
    """Every process's ``(scores, truth, sources)`` in rank order; this process's scores keep their
    gradient, the others' are constants."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([scores.shape[0]], device=scores.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(n) for n in sizes]
    rows = [scores.detach().double(), truth.double()]
    if sources is not None:
        rows.append(sources.to(scores.device).double())  # ids are small integers: exact in float64
    padded = F.pad(torch.stack(rows), (0, max(sizes) - scores.shape[0]))
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    all_scores = torch.cat([scores if r == rank else part[0, :n].to(scores.dtype)
                            for r, (part, n) in enumerate(zip(parts, sizes))])
    all_truth = torch.cat([part[1, :n] for part, n in zip(parts, sizes)]).float()
    all_sources = torch.cat([part[2, :n] for part, n in zip(parts, sizes)]).long() if sources is not None else None
    return all_scores, all_truth, all_sources

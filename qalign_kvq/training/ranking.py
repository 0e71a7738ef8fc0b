"""Pairwise rank losses on the expected level scores of a batch: the Thurstone fidelity loss
(DeQA-Score) and a margin loss, over all in-batch pairs or only homologous ones (two versions of
one source, what KVQ's Rank1 measures)."""

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
              kind: str = "fidelity", margin: float = 0.5, sources: torch.Tensor | None = None) -> torch.Tensor:
    """The ``kind`` loss (fidelity or margin) between the expected scores of ``level_logits`` and the
    true level scores ``truth`` over the batch's pairs (with ``sources``: homologous pairs only).
    0 (with a gradient path) when the batch has no such pair."""
    if kind not in RANK_LOSSES:
        raise ValueError(f"rank loss must be one of {RANK_LOSSES}, not {kind!r}")
    scores = expected_scores(level_logits, values)
    i, j = pair_indices(scores.shape[0], sources, device=scores.device)
    if i.numel() == 0:
        return scores.sum() * 0.0
    truth = truth.to(scores.device).float()
    if kind == "fidelity":
        return fidelity_loss(scores, truth, i, j)
    return margin_loss(scores, truth, i, j, margin)

"""The logits the quality losses read, and only those.

The losses need next-token logits at a handful of positions a row: those that predict the answer
tokens (CE) and the level position (KL, fidelity). The forward projects only these onto the
vocabulary: ``model(..., logits_to_keep=mask)`` with a boolean ``(batch, length)`` mask, which
transformers' ``slice_logits_to_keep`` (5.21+; and the mPLUG-Owl2 port) turns into ``(kept, vocab)``
logits. Older transformers take a 1-D tensor of positions shared by all rows: there the columns
any row needs are kept and each row's own are picked from them (more rows for the head, same
values). The rows keep right padding, so positions and attention are those of the full forward;
the forward goes through the top-level model (DDP / DeepSpeed wrappers included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def loss_positions(labels: torch.Tensor | None, level_positions: torch.Tensor, width: int) -> torch.Tensor:
    """``(batch, width)`` bool: each row's level position and, with ``labels``, every position whose
    next token is an answer token (``labels[:, 1:] != -100``)."""
    batch = level_positions.shape[0]
    keep = torch.zeros((batch, width), dtype=torch.bool, device=level_positions.device)
    if labels is not None:
        keep[:, :-1] = labels[:, 1:].to(keep.device) != -100
    keep[torch.arange(batch, device=keep.device), level_positions] = True
    return keep


@dataclass
class AnswerLogits:
    """``logits`` ``(kept, vocab)`` at the kept positions (row-major order), ``targets`` ``(kept,)``
    the next token there (-100 where it is no answer token), ``level_rows`` ``(batch,)`` the index in
    ``logits`` of each row's level position."""

    logits: torch.Tensor
    targets: torch.Tensor
    level_rows: torch.Tensor

    def answer_ce(self) -> torch.Tensor:
        """Next-token cross-entropy averaged over the answer tokens of the batch (float32)."""
        return F.cross_entropy(self.logits.float(), self.targets.to(self.logits.device), ignore_index=-100)

    def level_logits(self, level_token_ids: Sequence[int]) -> torch.Tensor:
        """``(batch, levels)`` float32 logits of the level tokens at each row's level position."""
        ids = torch.as_tensor(list(level_token_ids), device=self.logits.device)
        return self.logits[self.level_rows.to(self.logits.device)][:, ids].float()


def _takes_boolean_masks() -> bool:
    """Whether transformers' models select logits by a 2-D boolean mask (``slice_logits_to_keep``,
    5.21+). The mPLUG-Owl2 port takes both forms."""
    from transformers import modeling_utils

    return hasattr(modeling_utils, "slice_logits_to_keep")


def answer_logits(model, inputs: dict, labels: torch.Tensor | None, level_positions: torch.Tensor):
    """``(outputs, AnswerLogits)`` of ``model(**inputs)`` with logits only where the losses read them:
    the level positions, and the answer positions when ``labels`` is given (None: no CE needed)."""
    input_ids = inputs["input_ids"]
    width = input_ids.shape[1]
    positions = level_positions.to(input_ids.device).long()
    keep = loss_positions(labels, positions, width)
    if _takes_boolean_masks():
        outputs = model(**inputs, logits_to_keep=keep)
        logits = outputs.logits
    else:
        columns = keep.any(dim=0).nonzero().squeeze(1)
        outputs = model(**inputs, logits_to_keep=columns)
        logits = outputs.logits[keep[:, columns]]
    if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        raise RuntimeError(f"{type(model).__name__} ignored logits_to_keep: expected ({int(keep.sum())}, vocab) "
                           f"logits, got {tuple(logits.shape)}")
    following = torch.full_like(keep, -100, dtype=torch.long)
    if labels is not None:
        following[:, :-1] = labels[:, 1:].to(keep.device)
    index = keep.reshape(-1).cumsum(0) - 1  # flat position -> row of ``logits``
    rows = torch.arange(keep.shape[0], device=keep.device)
    return outputs, AnswerLogits(logits, following[keep], index[rows * width + positions])

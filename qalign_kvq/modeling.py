"""Level logits and level probabilities from a model forward pass.

The model's next-token logits at ``inputs.level_positions`` are read for the five level-word ids
only. The full-vocabulary logits of the whole sequence are never materialised: with left padding
(scoring) every level position is the last column and the forward runs with ``logits_to_keep=1``;
otherwise only the columns that hold a level position are projected onto the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qalign_kvq.families.base import ModelInputs


def level_logits(model, inputs: ModelInputs, level_ids: Sequence[int]) -> torch.Tensor:
    """``(B, len(level_ids))`` float32 logits of the level tokens at each row's level position.

    ``labels`` in ``inputs.batch`` are ignored (no loss is computed here). Gradients flow when the
    caller has them enabled.
    """
    batch = {key: value for key, value in inputs.batch.items() if key != "labels"}
    positions = inputs.level_positions.to(batch["input_ids"].device)
    width = batch["input_ids"].shape[1]
    if positions.numel() == 0:
        raise ValueError("level_logits: empty batch")
    if int(positions.min()) < 0 or int(positions.max()) >= width:
        raise ValueError(f"level_logits: level positions {positions.tolist()} outside a sequence of {width} tokens")
    rows = torch.arange(positions.shape[0], device=positions.device)
    if bool((positions == width - 1).all()):
        logits = model(**batch, logits_to_keep=1).logits[:, -1, :]
    else:
        columns, index = torch.unique(positions, return_inverse=True)
        logits = model(**batch, logits_to_keep=columns).logits[rows, index, :]
    ids = torch.as_tensor(list(level_ids), device=logits.device)
    return logits[:, ids].float()


def level_probs(model, inputs: ModelInputs, level_ids: Sequence[int]) -> torch.Tensor:
    """``(B, len(level_ids))`` float32 softmax over the level-token logits (ordered like ``level_ids``)."""
    return torch.softmax(level_logits(model, inputs, level_ids), dim=-1)

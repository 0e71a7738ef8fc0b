"""Views processed one at a time and joined (``view_batches.concat``) score as one processor call
over all of them, for every family: what lets views of several videos share a forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from qalign_kvq.families import get_family
from qalign_kvq.modeling import level_probs
from qalign_kvq.video import five_crop_views
from qalign_kvq.view_batches import concat, signature
from tests.fixtures_models import TINY_FAMILIES

torch.set_num_threads(1)


def _views(frames: int) -> list[np.ndarray]:
    """The five crops of a real clip panning across the astronaut photo (T == 1: an image)."""
    photo = data.astronaut()
    clip = np.stack([photo[8 * i: 8 * i + 200, 12 * i: 12 * i + 300] for i in range(frames)])
    return list(five_crop_views(clip).values())


@pytest.mark.parametrize("family_name", TINY_FAMILIES)
@pytest.mark.parametrize("frames", [4, 1])
def test_joined_rows_score_like_one_processor_call(tiny_models, family_name, frames):
    family = get_family(family_name)
    model, processor = family.load(str(tiny_models(family_name)))
    model.eval()
    ids = family.check_level_tokens(processor)
    views = _views(frames)
    rows = [family.build_inputs(processor, [view]) for view in views]
    assert len({signature(row) for row in rows}) == 1
    with torch.inference_mode():
        joined = level_probs(model, concat(rows), ids)
        together = level_probs(model, family.build_inputs(processor, views), ids)
        second = level_probs(model, rows[1], ids)
    torch.testing.assert_close(joined, together, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(joined[1:2], second, atol=1e-5, rtol=1e-4)
    if rows[0].visual_tokens is not None:
        assert concat(rows).visual_tokens == [rows[0].visual_tokens[0]] * 5

"""Qwen-VL vision attention in one call per layer (qalign_kvq.families.qwen_vision_attention): the
same vision features, logits and gradients as transformers' per-window loop (CPU, float32) for
Qwen2-VL, Qwen2.5-VL and Qwen3-VL, on images, videos and batches of clips whose windows are
partial; the swap keeps parameter names and weights; the switch reaches every loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from skimage import data as skdata

from qalign_kvq.families import get_family
from qalign_kvq.families.qwen_vision_attention import (
    PackedVisionAttention,
    SegmentLayout,
    segment_attention,
    set_vision_attention,
)
from tests.fixtures_models import load_builder

QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def vision_models(tmp_path_factory):
    """Tiny Qwen models with up to 64 merged tokens a frame and a vision tower initialised wide
    enough (std 0.2) that attention shapes its output."""
    root = tmp_path_factory.mktemp("tiny_vision")
    builder = load_builder()
    return {family: builder.build_tiny_model(family, root, frame_tokens=64, vision_init_std=0.2) for family in QWEN}


def _frames(count: int, height: int, width: int, shift: int = 9) -> np.ndarray:
    """``count`` real frames (a crop of scikit-image's astronaut moving right) of ``height x width``."""
    photo = skdata.astronaut()
    return np.stack([photo[40:40 + height, 20 + i * shift:20 + i * shift + width] for i in range(count)])


def _modules(model):
    return [m for m in model.modules() if isinstance(m, PackedVisionAttention)]


def test_segment_attention_is_attention_within_each_segment_only():
    torch.manual_seed(0)
    lengths = [5, 16, 1, 16, 9]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 2, 8) for _ in range(3))
    reference = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), scale=0.3)
        .transpose(0, 1) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    layout = SegmentLayout.from_cu_seqlens(cu)
    assert (layout.count, layout.longest) == (5, 16) and layout.slots is not None
    torch.testing.assert_close(segment_attention(q, k, v, layout, 0.3), reference, **TOL)
    # empty segments (repeated boundaries) are dropped; equal segments take the copy-free path
    uniform = SegmentLayout.from_cu_seqlens(torch.tensor([0, 8, 8, 16, 24], dtype=torch.int32))
    assert (uniform.count, uniform.longest, uniform.slots) == (3, 8, None)
    # a layout that lets segments see each other gives a different result: the comparisons can fail
    whole = SegmentLayout.from_cu_seqlens(torch.tensor([0, sum(lengths)], dtype=torch.int32))
    assert (segment_attention(q, k, v, whole, 0.3) - reference).abs().max() > 0.1
    with pytest.raises(ValueError, match="backend"):
        segment_attention(q, k, v, layout, 0.3, backend="flash")


@pytest.mark.parametrize("family", QWEN)
def test_vision_tower_matches_the_per_window_loop_on_many_layouts(family, vision_models):
    model, _ = get_family(family).load(str(vision_models[family]), vision_attention="stock")
    visual = model.model.visual.eval()
    cfg = visual.config
    patch = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    layouts = [
        [[1, 8, 12]],                          # an image, whole windows
        [[1, 6, 10]],                          # an image, partial windows (3x5 merged tokens)
        [[3, 14, 10]],                         # a video of three temporal patches, partial windows
        [[2, 10, 14], [1, 6, 8], [3, 4, 18]],  # a batch: two videos and an image of other sizes
    ]
    keys = list(model.state_dict())
    torch.manual_seed(0)
    for grid in layouts:
        grid = torch.tensor(grid)
        pixels = torch.randn(int(grid.prod(dim=1).sum()), patch)
        with torch.no_grad():
            set_vision_attention(model, "stock")
            stock = visual(pixels, grid_thw=grid)
            assert set_vision_attention(model, "packed") == len(visual.blocks)
            packed = visual(pixels, grid_thw=grid)
        torch.testing.assert_close(packed.pooler_output, stock.pooler_output, **TOL)
        torch.testing.assert_close(packed.last_hidden_state, stock.last_hidden_state, **TOL)
        assert stock.pooler_output.std() > 0.1
    assert list(model.state_dict()) == keys
    # some layer padded segments of different lengths (partial windows, frames of different sizes)
    assert any(layout.slots is not None for _, layout in _modules(model)[0]._layouts.entries)


@pytest.mark.parametrize("family", QWEN)
def test_logits_and_gradients_match_stock_for_images_videos_and_mixed_batches(family, vision_models):
    fam = get_family(family)
    model, processor = fam.load(str(vision_models[family]), vision_attention="stock")
    stock_modules = [m for m in model.modules() if type(m).__name__.endswith("VisionAttention")]
    batches = [
        [_frames(1, 150, 260)],                       # an image
        [_frames(4, 130, 230)],                       # a video
        [_frames(4, 200, 120), _frames(6, 90, 160)],  # two clips of different sizes and lengths
    ]
    for clips in batches:
        inputs = fam.build_inputs(processor, clips, level_words=["good"] * len(clips), padding_side="right")
        batch = {k: v for k, v in inputs.batch.items() if k != "labels"}
        results = {}
        for choice, checkpointing in (("stock", False), ("packed", False), ("packed", True)):
            fam.set_vision_attention(model, choice)
            if checkpointing:
                model.gradient_checkpointing_enable()
            else:
                model.gradient_checkpointing_disable()
            model.train()
            model.zero_grad()
            logits = model(**batch).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), inputs.batch["labels"][:, 1:]
                                                     .flatten(), ignore_index=-100)
            (loss + logits.square().mean()).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[choice, checkpointing] = logits.detach(), grads
        logits, grads = results["stock", False]
        assert any(n.startswith("model.visual.blocks.0.attn.qkv") for n in grads)
        for key in (("packed", False), ("packed", True)):
            torch.testing.assert_close(results[key][0], logits, **TOL)
            assert results[key][1].keys() == grads.keys()
            for name in grads:
                torch.testing.assert_close(results[key][1][name], grads[name], **TOL, msg=name)
    fam.set_vision_attention(model, "stock")
    restored = [m for m in model.modules() if type(m).__name__.endswith("VisionAttention")]
    assert all(a is b for a, b in zip(restored, stock_modules)) and len(restored) == len(stock_modules)


def test_swap_shares_weights_and_keeps_state_dict_lora_and_saving(vision_models, tmp_path):
    from qalign_kvq.training.model import prepare_model

    fam = get_family("qwen2_5_vl")
    stock, _ = fam.load(str(vision_models["qwen2_5_vl"]), vision_attention="stock")
    packed, _ = fam.load(str(vision_models["qwen2_5_vl"]))  # packed is the default
    modules = _modules(packed)
    assert len(modules) == 2 and not _modules(stock)
    assert modules[0].qkv is modules[0].stock.qkv and modules[0].proj is modules[0].stock.proj
    a, b = stock.state_dict(), packed.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # LoRA on the vision tower's qkv too: the same adapter names either way, and it saves and reloads
    lora = {"lora_targets": ["q_proj", "v_proj", "qkv"], "freeze_vision": False}
    peft_stock = prepare_model(stock, fam, "lora", **lora)
    peft_packed = prepare_model(packed, fam, "lora", **lora)
    names = [n for n, p in peft_packed.named_parameters() if p.requires_grad]
    assert names == [n for n, p in peft_stock.named_parameters() if p.requires_grad]
    assert any("visual.blocks.0.attn.qkv.lora_A" in n for n in names)
    peft_stock.save_pretrained(tmp_path / "stock")
    peft_packed.save_pretrained(tmp_path / "packed")
    saved = [load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("stock", "packed")]
    assert saved[0].keys() == saved[1].keys() and any(".attn.qkv." in k for k in saved[0])
    fam.set_vision_attention(peft_packed, "stock")  # back to stock: the LoRA-wrapped qkv goes along
    assert isinstance(peft_packed.base_model.model.model.visual.blocks[0].attn.qkv, BaseTunerLayer)


def test_the_switch_reaches_every_loader(tiny_models):
    from qalign_kvq.loading import load_checkpoint
    from qalign_kvq.scorer import Scorer
    from qalign_kvq.training.arguments import ModelArguments
    from qalign_kvq.training.model import load_for_training

    path = tiny_models("qwen3_vl")
    assert len(_modules(load_checkpoint(path)[0])) == 2
    assert not _modules(load_checkpoint(path, vision_attention="stock")[0])
    assert not _modules(Scorer.from_pretrained(path, vision_attention="stock").models[0].model)
    assert len(_modules(Scorer.from_pretrained(path).models[0].model)) == 2
    assert not _modules(load_for_training(str(path), vision_attention="stock").model)
    assert ModelArguments(model_name_or_path="x").vision_attention == "packed"
    with pytest.raises(ValueError, match="vision_attention must be"):
        ModelArguments(model_name_or_path="x", vision_attention="loop")
    with pytest.raises(ValueError, match="vision_attention must be one of packed, stock"):
        get_family("qwen3_vl").load(str(path), vision_attention="flash")
    # families without a per-window loop accept the switch and keep their model as it is
    model, _ = get_family("mplug_owl2").load(str(tiny_models("mplug_owl2")), vision_attention="stock")
    assert not _modules(model)

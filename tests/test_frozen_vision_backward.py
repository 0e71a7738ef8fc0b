"""LoRA with gradient checkpointing and a frozen vision tower: a real training step sends no
backward pass through the vision tower (transformers' enable_input_require_grads hooks its patch
embedding; QualityTrainer removes that hook), while the LoRA adapters still train; with the
vision tower trained, its backward still runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata
from transformers import TrainingArguments

from qalign_kvq.families import get_family
from qalign_kvq.levels import soft_label
from qalign_kvq.training.collator import QualityCollator
from qalign_kvq.training.model import prepare_model
from qalign_kvq.training.trainer import QualityTrainer


def _examples() -> list[dict]:
    photo = skdata.astronaut()
    clips = [np.stack([photo[30 + 6 * i:230 + 6 * i, 40:360] for i in range(4)]) for _ in range(2)]
    return [{"clip": clip, "question": "Rate the quality of this video.", "level_word": word, "level_score": score,
             "soft_label": soft_label(score), "mos": score} for clip, word, score in zip(clips, ("good", "bad"),
                                                                                       (4.0, 1.0))]


@pytest.mark.parametrize("freeze_vision", [True, False])
def test_lora_step_with_checkpointing_skips_the_backward_of_a_frozen_vision_tower(freeze_vision, tiny_models,
                                                                                   tmp_path):
    family = get_family("qwen2_5_vl")
    model, processor = family.load(str(tiny_models("qwen2_5_vl")))
    targets = ["q_proj", "v_proj", "qkv"]  # qkv: the vision blocks' attention, adapted when the tower trains
    model = prepare_model(model, family, "lora", lora_targets=targets, freeze_vision=freeze_vision,
                          gradient_checkpointing=True)
    backward_calls = []
    model.base_model.model.model.visual.blocks[-1].register_full_backward_hook(
        lambda module, grad_in, grad_out: backward_calls.append(1))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1,
                             per_device_train_batch_size=2, save_strategy="no", remove_unused_columns=False,
                             gradient_checkpointing=True, learning_rate=1e-3)
    trainer = QualityTrainer(model=model, args=args, train_dataset=_examples(),
                             data_collator=QualityCollator(family, processor),
                             level_token_ids=family.level_token_ids(processor.tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    moved = {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p)}
    assert any(".language_model." in n and "lora_" in n for n in moved)
    if freeze_vision:
        assert backward_calls == [], "no backward through the frozen vision tower"
        assert not any(".visual." in n for n in moved)
    else:
        assert backward_calls, "the trained vision tower gets its backward"
        assert any(".visual." in n and "lora_" in n for n in moved)

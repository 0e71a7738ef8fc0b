"""Fine-tune an LMM to answer "The quality of the video is <level>." for MOS-labelled videos.

    accelerate launch recipes/finetune.py recipes/configs/<recipe>.yaml [--key value ...]

Any field of the YAML (model, data, method arguments and every ``transformers.TrainingArguments``
field) can be overridden by a flag. ``--resume_from_checkpoint last`` continues the newest
``checkpoint-*`` in ``output_dir``. At the end ``output_dir`` holds the weights (safetensors) or the
peft adapter, the processor, ``qalign_kvq.json`` (family and its options, MOS range, question,
frames, metrics): everything ``python -m qalign_kvq.infer`` needs, the model card (``README.md``)
and its pictures: ``training_curves.png`` (training loss, validation SROCC/PLCC/Final per
evaluation) and, with a validation set, ``validation_scatter.png`` of the saved model. With ``push_to_hub: true`` and ``hub_model_id: ORG/NAME`` (optional
``hub_private_repo``, ``hub_token``) the first process then uploads ``output_dir`` with
``qalign_kvq.hub.push_to_hub``; the Trainer itself never pushes.

Under several processes the videos are checked by all of them (each its share) once the process
group exists, and the model card and push happen after the last collective, so neither counts
against ``ddp_timeout``; README.md ("Multi-GPU and multi-node") says what each launch mode assumes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import transformers

from qalign_kvq.annotations import add_levels, balance, check_videos, read_rank_pairs, read_table
from qalign_kvq.checkpoint import CheckpointMeta
from qalign_kvq.distributed import broadcast, end_process_group
from qalign_kvq.families.base import DEFAULT_QUESTION, QUESTIONS
from qalign_kvq.hub import HubError, MissingTokenError, push_to_hub
from qalign_kvq.levels import LEVEL_WORDS, LevelScale, check_vocabulary
from qalign_kvq.model_card import write_model_card
from qalign_kvq.plots import save_run_pictures
from qalign_kvq.training.arguments import parse_args
from qalign_kvq.training.batching import GroupedBatchSampler, clip_token_lengths, describe
from qalign_kvq.training.collator import QualityCollator
from qalign_kvq.training.dataset import ClipDataset, EpochCallback
from qalign_kvq.training.ema import EMACallback
from qalign_kvq.training.model import (
    in_group,
    load_for_training,
    prepare_model,
    resolve_dtype,
    save_outputs,
    trainable_summary,
)
from qalign_kvq.training.resume import last_complete_checkpoint
from qalign_kvq.training.trainer import QualityTrainer, make_compute_metrics

logger = logging.getLogger("qalign_kvq.finetune")


def training_arguments(fields: dict, method, has_val: bool, has_pairs: bool) -> transformers.TrainingArguments:
    """``TrainingArguments`` from the parsed fields plus what the recipe needs whatever the YAML says
    (its own batch keys are kept, evaluation reads ``mos``) and defaults that depend on the run."""
    fields = {**fields, "remove_unused_columns": False, "label_names": ["mos"]}
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.cuda.is_available():
        # CPU processes talk over gloo. The Trainer passes the backend on for DDP but not for
        # DeepSpeed, whose ranks would each believe they are alone, and ddp_timeout to neither on
        # CPU: set the state up here instead, with both.
        from accelerate import PartialState

        timeout = timedelta(seconds=fields.get("ddp_timeout") or 1800)
        if fields.get("deepspeed"):
            if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
                raise RuntimeError("DeepSpeed on CPU: launch without ACCELERATE_USE_CPU=1 (it makes the Trainer skip "
                                   "DeepSpeed); see recipes/accelerate/cpu_zero2.yaml")
            PartialState(backend="gloo", timeout=timeout)
        else:
            PartialState(cpu=True, backend=fields.get("ddp_backend") or "gloo", timeout=timeout)
        config = fields.get("accelerator_config") or {}
        config = json.loads(config) if isinstance(config, str) else dict(config)
        fields["accelerator_config"] = {**config, "use_configured_state": True}
    if fields.get("gradient_checkpointing"):
        if fields.get("gradient_checkpointing_kwargs") is None:
            # PEFT + ZeRO-3 needs reentrant checkpointing (the adapter's inputs get requires_grad);
            # elsewhere non-reentrant, which DDP's find_unused_parameters and vision adapters work with.
            fields["gradient_checkpointing_kwargs"] = {"use_reentrant": method.method == "lora"
                                                       and zero_stage(fields.get("deepspeed")) == 3}
        kwargs = fields["gradient_checkpointing_kwargs"]
        kwargs = json.loads(kwargs) if isinstance(kwargs, str) else kwargs
        if kwargs.get("use_reentrant", True) and fields.get("ddp_find_unused_parameters") is None:
            # reentrant backward passes mark parameters ready more than once: DDP must not look for
            # unused ones (the Trainer does this for a PreTrainedModel, not for a PeftModel)
            fields["ddp_find_unused_parameters"] = False
    if not has_val:
        fields.update(eval_strategy="no", load_best_model_at_end=False, metric_for_best_model=None)
    elif fields.get("metric_for_best_model") in (None, "Final"):
        fields["metric_for_best_model"] = "Final" if has_pairs else "SROCC"  # Final needs both kinds of pairs
    if fields.get("metric_for_best_model") in ("Final", "SROCC", "PLCC", "Rank1", "Rank2"):
        fields["greater_is_better"] = True
    report_to = fields.get("report_to") or "none"
    report_to = report_to if isinstance(report_to, list) else [report_to]
    if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is None:
        logger.warning("tensorboard is not installed: not logging to it")
        report_to = [r for r in report_to if r != "tensorboard"] or ["none"]
    fields["report_to"] = report_to
    return transformers.TrainingArguments(**fields)


def zero_stage(deepspeed) -> int | None:
    """The ZeRO stage of a DeepSpeed config (path, JSON text or mapping); None without one."""
    if not deepspeed:
        return None
    if isinstance(deepspeed, str):
        deepspeed = json.loads(deepspeed if deepspeed.lstrip().startswith("{") else Path(deepspeed).read_text())
    stage = deepspeed.get("zero_optimization", {}).get("stage")
    return int(stage) if isinstance(stage, int) or str(stage).isdigit() else None


def hub_push_settings(fields: dict) -> dict | None:
    """Take ``push_to_hub`` and ``hub_token`` out of the ``TrainingArguments`` fields (the Trainer's
    own push would upload its own card and every checkpoint) and return ``push_to_hub``'s keyword
    arguments, or None when not pushing. The repo id and the token are checked before training."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    push = fields.pop("push_to_hub", False)
    token = fields.pop("hub_token", None)
    if not push:
        return None
    repo_id = fields.get("hub_model_id")
    if not repo_id:
        raise HubError("push_to_hub: true needs hub_model_id (ORG/NAME on the Hugging Face Hub)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(f"hub_model_id {repo_id!r}: not a valid Hub repo id like ORG/NAME ({err})") from err
    token = token or get_token()
    if not token:
        raise MissingTokenError(f"push_to_hub to {repo_id} needs a Hugging Face token with write access: run "
                                "`hf auth login`, set HF_TOKEN, or give hub_token")
    return {"repo_id": repo_id, "private": bool(fields.get("hub_private_repo")), "token": token}


def load_tables(data_args, soft_labels: bool, seed: int):
    """``(train, val, scale, pairs)``: annotation tables with levels (the bins from the training MOS
    range unless given); ``val``/``pairs`` may be None. The videos are checked by :func:`check_tables`."""
    train = read_table(data_args.train_csv, data_args.video_root)
    words, scores = check_vocabulary(data_args.level_words or LEVEL_WORDS, data_args.level_scores)
    scale = (LevelScale(data_args.mos_low, data_args.mos_high, tuple(scores)) if data_args.mos_low is not None
             else LevelScale.from_scores(train["score"], scores))
    train = add_levels(train, scale, soft_labels=soft_labels, min_std=data_args.soft_label_min_std, words=words)
    if data_args.balance_levels:
        train = balance(train, seed=seed)
    val, pairs = None, None
    if data_args.val_csv:
        val = add_levels(read_table(data_args.val_csv, data_args.val_video_root or data_args.video_root), scale,
                         words=words)
        pairs = read_rank_pairs(data_args.val_pairs_homologous, data_args.val_pairs_nonhomologous,
                                data_args.val_pairs_xlsx, known=val["filename"])
    return train, val, scale, pairs


def check_tables(data_args, train, val) -> dict[str, tuple[int, float]]:
    """Check every video before anything trains (``check_videos``: on every process, each probing
    its share; all raise the same error); returns what the probes found (path -> (frames, fps))."""
    if data_args.check_videos == "none":
        return {}
    readable = data_args.check_videos == "probe"
    counts = check_videos(train, data_args.train_csv, readable=readable, timeout=data_args.check_videos_timeout)
    if val is not None:
        counts.update(check_videos(val, data_args.val_csv, readable=readable, timeout=data_args.check_videos_timeout))
    return counts
def check_tricks(train, data_args, method, training_args) -> None:
    """Refuse, before the model loads, the training options this run cannot honour."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    needs_sources = [name for name, on in (("source_group_size", data_args.source_group_size),
                                           ("rank_pairs: homologous", method.rank_pairs == "homologous")) if on]
    if needs_sources and "source" not in train.column_names:
        raise ValueError(f"{', '.join(needs_sources)} needs a source column in {data_args.train_csv}: write one with "
                         f"python -m qalign_kvq.sources --annotations {data_args.train_csv} --root "
                         f"{data_args.video_root} --output <table with sources>")
    if training_args.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
        raise ValueError(f"train_sampling_strategy={training_args.train_sampling_strategy} reads token lengths from "
                         "the dataset's items, which are undecoded clips here; use group_by_length: true (token counts "
                         "from the processor) and/or source_group_size")
    if method.ema_decay is not None and is_deepspeed_zero3_enabled():
        raise ValueError("ema_decay with DeepSpeed ZeRO-3: each process holds only shards of the weights; use ZeRO-2 "
                         "(ds_configs/zero2.json) or DDP")


def train_batch_sampler(train, data_args, training_args, family, processor) -> GroupedBatchSampler | None:
    """The grouped batch sampler when ``source_group_size`` or ``group_by_length`` asks for one."""
    if not (data_args.source_group_size or data_args.group_by_length):
        return None
    lengths = (clip_token_lengths(train, family, processor, data_args.num_frames, data_args.crop_ratio)
               if data_args.group_by_length else None)
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    sampler = GroupedBatchSampler(
        len(train), training_args.per_device_train_batch_size, seed=seed,
        sources=train["source"] if data_args.source_group_size else None, group_size=data_args.source_group_size,
        lengths=lengths, drop_last=training_args.dataloader_drop_last, num_replicas=training_args.world_size,
        rank=training_args.process_index)
    logger.info("train batches, epoch 0: %s", describe(sampler))
    return sampler


def release_engine(trainer: transformers.Trainer) -> None:
    """Once the model is saved and while the process group still lives: destroy the DeepSpeed engine
    (its ZeRO-3 parameter hooks and communication handles) and collect what only cycles keep, so
    that nothing holding tensors is left to the interpreter's shutdown, where it can abort a rank
    that has finished ("terminate called without an active exception"). The log history and the
    last predictions, which the recipe still reads, stay."""
    import gc

    trainer.accelerator.free_memory()
    gc.collect()


def main(argv: list[str] | None = None, callbacks: list | None = None) -> Path:
    """Run a recipe: ``argv`` as on the command line; ``callbacks``: extra ``TrainerCallback``s."""
    model_args, data_args, method, training_fields = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    push = hub_push_settings(training_fields)
    seed = training_fields.get("seed", 42)
    transformers.set_seed(seed)

    train, val, scale, pairs = load_tables(data_args, soft_labels=method.loss == "deqa", seed=seed)
    level_words = list(data_args.level_words or LEVEL_WORDS)
    has_pairs = bool(pairs and pairs.homologous and pairs.nonhomologous)  # Final needs both
    training_args = training_arguments(training_fields, method, val is not None, has_pairs)
    check_tricks(train, data_args, method, training_args)
    # Set up the process group now: ZeRO-3 partitions the weights while they load (zero.Init), and
    # needs to know the world size by then; the video check is shared out over it.
    logger.info("device %s, process %d of %d", training_args.device, training_args.process_index,
                training_args.world_size)
    if method.loss == "deqa" and method.rank_weight > 0 and \
            training_args.per_device_train_batch_size * training_args.world_size < 2:
        raise ValueError("loss deqa: the fidelity rank loss pairs the clips of one step across all processes and "
                         "needs at least 2 of them (per_device_train_batch_size x processes), or rank_weight: 0")
    probed = check_tables(data_args, train, val)

    # Model.
    dtype = resolve_dtype(model_args.dtype, method.method)
    load_kwargs = {"attn_implementation": model_args.attn_implementation} if model_args.attn_implementation else {}
    load_kwargs["vision_attention"] = model_args.vision_attention
    loaded = load_for_training(model_args.model_name_or_path, model_args.family, dtype=dtype,
                               family_options=model_args.family_options, **load_kwargs)
    processor, family = loaded.processor, loaded.family
    level_ids = family.check_level_tokens(processor, level_words)
    logger.info("family %s %s, level token ids %s", family.name, family.options(), level_ids)
    model = prepare_model(loaded.model, family, method.method, lora_r=method.lora_r, lora_alpha=method.lora_alpha,
                          lora_dropout=method.lora_dropout, lora_targets=method.lora_target_modules,
                          freeze_vision=method.freeze_vision, freeze_projector=method.freeze_projector,
                          freeze_language=method.freeze_language,
                          gradient_checkpointing=training_args.gradient_checkpointing)
    logger.info("%s (%s, %s)", trainable_summary(model), family.name, method.method)

    questions = QUESTIONS if data_args.question_paraphrases else (DEFAULT_QUESTION,)
    train_ds = ClipDataset(train, data_args.num_frames, train=True, seed=training_args.seed,
                           crop_ratio=data_args.crop_ratio, reverse_prob=data_args.reverse_prob, questions=questions,
                           probed=probed)
    val_ds = (ClipDataset(val, data_args.eval_num_frames, train=False, probed=probed)
              if val is not None else None)
    sampler = train_batch_sampler(train, data_args, training_args, family, processor)
    resume = training_args.resume_from_checkpoint
    if resume in ("last", "auto", "true", "True"):  # process 0 picks, so that all resume the same one
        resume = broadcast(last_complete_checkpoint(training_args.output_dir, training_args.save_only_model)
                           if training_args.process_index == 0 else None)
        logger.info("resuming from %s", resume or "scratch (no complete checkpoint found)")
    tricks = []
    if method.ema_decay is not None:
        tricks.append(EMACallback(method.ema_decay, warmup=method.ema_warmup, on_cpu=method.ema_on_cpu,
                                  resume_from_checkpoint=resume))
    vision_prefixes = tuple(family.vision_prefixes) + tuple(family.projector_prefixes)
    trainer = QualityTrainer(
        model=model, args=training_args, train_dataset=train_ds, eval_dataset=val_ds,
        data_collator=QualityCollator(family, processor, scale.scores), processing_class=processor,
        compute_metrics=(make_compute_metrics(val["filename"], val["score"], scale, pairs.homologous,
                                              pairs.nonhomologous) if val is not None else None),
        callbacks=[EpochCallback(train_ds, sampler), *(callbacks or []), *tricks],
        level_token_ids=level_ids, level_scores=scale.scores, loss=method.loss,
        ce_weight=method.ce_weight, kl_weight=method.kl_weight, rank_weight=method.rank_weight,
        rank_loss=method.rank_loss, rank_pairs=method.rank_pairs, rank_margin=method.rank_margin,
        train_batch_sampler=sampler, vision_learning_rate=method.vision_learning_rate,
        vision_param_filter=lambda name: in_group(name, vision_prefixes),
    )

    if training_args.deepspeed and not trainer.is_deepspeed_enabled:
        raise RuntimeError(f"DeepSpeed config {training_args.deepspeed} given but the Trainer runs without DeepSpeed "
                           f"(on CPU, launch DeepSpeed runs without ACCELERATE_USE_CPU=1; see recipes/accelerate/)")
    state = trainer.accelerator.state
    logger.info("distributed: %s, %d processes, deepspeed: %s", state.distributed_type, state.num_processes,
                trainer.is_deepspeed_enabled)
    trainer.train(resume_from_checkpoint=resume)

    metrics = None
    if val_ds is not None:
        metrics = {k.removeprefix("eval_"): float(v) for k, v in trainer.evaluate().items()
                   if k.removeprefix("eval_") in ("SROCC", "PLCC", "Rank1", "Rank2", "Final")}
    lora = method.method == "lora"
    meta = CheckpointMeta(
        family=family.name, mos_low=scale.low, mos_high=scale.high, question=DEFAULT_QUESTION,
        level_words=level_words, level_scores=list(scale.scores) if data_args.level_words else None,
        train_frames=data_args.num_frames, base_model=loaded.base_model if lora else None,
        base_revision=loaded.base_revision if lora else None, protocol=model_args.scoring_protocol,
        metrics=metrics, family_options=family.options(),
        recipe={"method": method.method, "loss": method.loss, "base": loaded.base_model,
                "train_csv": data_args.train_csv, "epochs": training_args.num_train_epochs,
                "max_steps": training_args.max_steps, "learning_rate": training_args.learning_rate,
                **{key: value for key, value in (("ema_decay", method.ema_decay), ("rank_pairs", method.rank_pairs),
                                                 ("source_group_size", data_args.source_group_size))
                   if value not in (None, 0, "all")}},
    )
    out = save_outputs(trainer, processor, meta, training_args.output_dir)
    logger.info("saved %s", out)
    release_engine(trainer)
    end_process_group()  # the last collective: what follows runs on process 0 alone, under no timeout
    if trainer.is_world_process_zero():
        validation = trainer.compute_metrics  # holds the last evaluation's predictions (the model saved)
        save_run_pictures(out, trainer.state.log_history, getattr(validation, "last_predictions", None),
                          getattr(validation, "truth", None), metrics, scale)
        write_model_card(out, push["repo_id"] if push else str(out))
        if push:
            url = push_to_hub(out, push["repo_id"], private=push["private"], token=push["token"])
            logger.info("pushed %s to %s", out, url)
    return out


if __name__ == "__main__":
    main()

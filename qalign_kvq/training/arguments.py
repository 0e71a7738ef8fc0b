"""Fine-tuning arguments: model, data and method dataclasses (with ``help`` metadata), parsed with
``transformers.HfArgumentParser`` together with ``TrainingArguments`` from YAML and/or flags."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml


def _f(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ModelArguments:
    model_name_or_path: str = _f(None, "Base model: a local directory or hub id (a qalign-kvq LoRA output "
                                       "directory continues training that adapter).")
    family: str | None = _f(None, "Model family (qwen2_5_vl, qwen3_vl, llava_onevision, internvl, mplug_owl2, ...); "
                                  "default: from config.model_type.")
    dtype: str = _f("auto", "Weights dtype when loading: auto (bfloat16 on GPU, float32 on CPU), bfloat16, float32.")
    attn_implementation: str | None = _f(None, "Attention implementation passed to from_pretrained (e.g. sdpa, "
                                               "flash_attention_2).")
    vision_attention: str = _f("packed", "Qwen-VL vision attention: packed (all windows and frames of a layer in "
                                         "one call) or stock (transformers' loop over them); other families "
                                         "ignore it.", choices=["packed", "stock"])
    family_options: dict | str | None = _f(None, "Options of the family, a mapping (YAML/JSON), e.g. {frame_pixels: "
                                                 "602112} (the per-frame pixel budget, default: the model's own "
                                                 "video default), {prompt_layout: vicuna_v1} for mplug_owl2 "
                                                 "(qwen_1_5 for llava_onevision, internvl2_5 for internvl: the "
                                                 "authors' training conversation; default chat_template), "
                                                 "{clip_fps: 2} for Qwen; stored in qalign_kvq.json (budget "
                                                 "resolved) so scoring builds the family alike.")
    scoring_protocol: str = _f("kvq", "Scoring protocol stored with the checkpoint: kvq (12 frames x FiveCrop, MOS "
                                      "scale) or authors (whole frames at the family's rate, expected level).")

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required")
        if isinstance(self.family_options, str):
            try:
                self.family_options = yaml.safe_load(self.family_options)
            except yaml.YAMLError as err:
                raise ValueError(f"family_options: not a YAML/JSON mapping ({err})") from None
        if self.family_options is None:
            self.family_options = {}
        if not isinstance(self.family_options, dict):
            raise ValueError(f"family_options must be a mapping of option names to values, not {self.family_options!r}")
        if self.vision_attention not in ("packed", "stock"):
            raise ValueError(f"vision_attention must be packed or stock, not {self.vision_attention!r}")
        from qalign_kvq.scoring import PROTOCOLS

        if self.scoring_protocol not in PROTOCOLS:
            raise ValueError(f"scoring_protocol must be one of {', '.join(PROTOCOLS)}, not {self.scoring_protocol!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, not {self.dtype!r}")


@dataclass
class DataArguments:
    train_csv: str = _f(None, "Training annotations: CSV (filename,score[,std]) or JSONL.")
    video_root: str = _f(None, "Directory the training filenames are relative to.")
    val_csv: str | None = _f(None, "Validation annotations (CSV or JSONL); enables evaluation.")
    val_video_root: str | None = _f(None, "Directory of the validation videos (default: video_root).")
    val_pairs_homologous: str | None = _f(None, "Homologous rank-pair CSV (video1,video2,label) for Rank1.")
    val_pairs_nonhomologous: str | None = _f(None, "Non-homologous rank-pair CSV for Rank2.")
    val_pairs_xlsx: str | None = _f(None, "The released rank-pair xlsx (sheets source and nonsource).")
    mos_low: float | None = _f(None, "Low end of the MOS range for the level bins (default: training min).")
    mos_high: float | None = _f(None, "High end of the MOS range for the level bins (default: training max).")
    balance_levels: bool = _f(False, "Resample the training set so every level has as many rows as the largest.")
    num_frames: int = _f(8, "Frames drawn at random per training clip (even for Qwen's temporal patch of 2).")
    eval_num_frames: int = _f(8, "Frames taken at equal intervals per validation clip.")
    crop_ratio: float = _f(0.9, "Side ratio of the random crop shared by all frames of a clip (1 = no crop).")
    reverse_prob: float = _f(0.5, "Probability of reversing a training clip in time.")
    question_paraphrases: bool = _f(True, "Sample the question from the paraphrase set (else always the default).")
    check_videos: str = _f("probe", "Before training: 'probe' every video (missing or unreadable rows are "
                                    "reported), 'exists' (files only) or 'none'. Under several processes each "
                                    "looks for every file and probes its share.")
    check_videos_timeout: float = _f(6 * 3600.0, "Seconds the processes wait for each other's share of "
                                                 "check_videos (its own timeout, not ddp_timeout): raise it "
                                                 "for very large sets on slow storage.")
    soft_label_min_std: float = _f(0.2, "Below this std (level units) soft labels split between two adjacent levels.")
    level_words: list[str] | None = _f(None, "Level vocabulary, best first (default: excellent good fair poor bad); "
                                             "each word must be one token after the answer prefix. Equal-width MOS "
                                             "bins, one per word; stored with the checkpoint and used for scoring.")
    level_scores: list[float] | None = _f(None, "Score of each level word, best first, equally spaced (default: 5 "
                                                "down to 1 whatever the number of words).")
    source_group_size: int = _f(0, "Homologous batches: put this many versions of one source side by side in a "
                                   "training batch (needs a source column, see python -m qalign_kvq.sources; must "
                                   "divide per_device_train_batch_size; 0: off).")
    group_by_length: bool = _f(False, "Batch clips of one token length (from the processor's count for each video's "
                                      "size) together, so batches carry almost no padding; logs the padding share. "
                                      "Composes with source_group_size.")

    def __post_init__(self):
        if not self.train_csv or not self.video_root:
            raise ValueError("train_csv and video_root are required")
        if self.check_videos not in ("probe", "exists", "none"):
            raise ValueError(f"check_videos must be probe, exists or none, not {self.check_videos!r}")
        if self.check_videos_timeout <= 0:
            raise ValueError(f"check_videos_timeout must be > 0 seconds, not {self.check_videos_timeout}")
        if not 0 < self.crop_ratio <= 1:
            raise ValueError(f"crop_ratio must be in (0, 1], not {self.crop_ratio}")
        if self.num_frames < 1 or self.eval_num_frames < 1:
            raise ValueError("num_frames and eval_num_frames must be >= 1")
        if (self.mos_low is None) != (self.mos_high is None):
            raise ValueError("give both mos_low and mos_high, or neither")
        if self.level_scores is not None and self.level_words is None:
            raise ValueError("level_scores needs level_words")
        if self.level_words is not None:
            from qalign_kvq.levels import check_vocabulary

            check_vocabulary(self.level_words, self.level_scores)
        if self.source_group_size < 0 or self.source_group_size == 1:
            raise ValueError(f"source_group_size must be 0 (off) or >= 2, not {self.source_group_size}")


@dataclass
class MethodArguments:
    method: str = _f("lora", "lora (peft adapter) or full (all unfrozen weights).")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_target_modules: list[str] | None = _f(None, "LoRA target module names (default: the family's).")
    freeze_vision: bool = _f(True, "Freeze the vision tower (unfrozen with LoRA, it gets adapters on its layers' "
                                   "attention and MLP).")
    freeze_projector: bool | None = _f(None, "Freeze the projector/abstractor (default: frozen for LoRA unless "
                                             "the family trains it, trained for full).")
    freeze_language: bool = _f(False, "Freeze the language model (full) / put no adapter on it (LoRA: then the "
                                      "vision tower must be unfrozen).")
    vision_learning_rate: float | None = _f(None, "Learning rate of the vision tower and projector (default: "
                                                  "learning_rate).")
    loss: str = _f("ce", "ce: cross-entropy on the answer tokens (Q-Align); deqa: soft-label KL at the level "
                         "position + rank loss on in-batch pairs + weighted CE (DeQA-Score); ce_rank: CE + rank "
                         "loss (the KVQ teams' rank losses on top of Q-Align).")
    ce_weight: float = _f(1.0, "Weight of the answer cross-entropy (DeQA uses 0.05).")
    kl_weight: float = _f(1.0, "Weight of the soft-label KL (deqa loss).")
    rank_weight: float = _f(1.0, "Weight of the rank loss (deqa and ce_rank losses).")
    rank_loss: str = _f("fidelity", "Rank loss on the expected level scores of pairs: fidelity (Thurstone, "
                                    "DeQA-Score) or margin (max(0, rank_margin - ordered score gap)).")
    rank_pairs: str = _f("all", "Pairs the rank loss sees: all in-batch pairs, or homologous (same source; needs "
                                "the source column, best with source_group_size).")
    rank_margin: float = _f(0.5, "Margin of the margin rank loss, in level-score units.")
    ema_decay: float | None = _f(None, "Keep an exponential moving average of the trainable weights with this decay "
                                       "(e.g. 0.99); evaluation, best-checkpoint selection and the saved model use it.")
    ema_warmup: bool = _f(False, "EMA decay min(ema_decay, (1 + t) / (10 + t)) at update t: early updates move the "
                                 "average faster.")
    ema_on_cpu: bool = _f(False, "Keep the EMA copy in CPU memory (full fine-tuning of large models).")

    def __post_init__(self):
        from qalign_kvq.training.ranking import RANK_LOSSES, RANK_PAIRS

        if self.method not in ("lora", "full"):
            raise ValueError(f"method must be lora or full, not {self.method!r}")
        if self.loss not in ("ce", "deqa", "ce_rank"):
            raise ValueError(f"loss must be ce, deqa or ce_rank, not {self.loss!r}")
        if min(self.ce_weight, self.kl_weight, self.rank_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if self.rank_loss not in RANK_LOSSES:
            raise ValueError(f"rank_loss must be one of {', '.join(RANK_LOSSES)}, not {self.rank_loss!r}")
        if self.rank_pairs not in RANK_PAIRS:
            raise ValueError(f"rank_pairs must be one of {', '.join(RANK_PAIRS)}, not {self.rank_pairs!r}")
        if self.rank_margin < 0:
            raise ValueError(f"rank_margin must be >= 0, not {self.rank_margin}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), not {self.ema_decay}")


def config_to_argv(config: dict) -> list[str]:
    """A flat YAML mapping -> command-line flags (``--key value``), so flags given after it win."""
    argv: list[str] = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def load_config(path: str | os.PathLike) -> dict:
    """Read a recipe YAML (a flat mapping of argument names to values)."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values")
    return config


def parse_args(argv: Sequence[str]) -> tuple[ModelArguments, DataArguments, MethodArguments, dict]:
    """``[CONFIG.yaml] [--key value ...]`` -> ``(ModelArguments, DataArguments, MethodArguments,
    training_fields)``; ``training_fields`` are the parsed ``TrainingArguments`` fields, to be
    completed by the recipe and passed to ``TrainingArguments(**fields)`` once (creating it sets up
    the distributed state). Unknown keys, in the YAML or the flags, are errors."""
    from transformers import HfArgumentParser, TrainingArguments

    argv = list(argv)
    merged: list[str] = []
    source = "command line"
    if argv and not argv[0].startswith("--"):
        source = argv[0]
        merged = config_to_argv(load_config(argv.pop(0)))
    classes = (ModelArguments, DataArguments, MethodArguments, TrainingArguments)
    namespace, unknown = HfArgumentParser(classes).parse_known_args(merged + argv)
    if unknown:
        raise ValueError(f"{source}: unknown arguments {unknown}")
    values = vars(namespace)
    parsed = []
    for cls in classes[:3]:
        parsed.append(cls(**{f.name: values.pop(f.name) for f in fields(cls) if f.init}))
    training = {f.name: values.pop(f.name) for f in fields(TrainingArguments) if f.init and f.name in values}
    return (*parsed, training)

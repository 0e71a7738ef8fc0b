"""Fine-tuning: arguments, clip datasets, the collator, the quality Trainer and model preparation.

The entry point is ``accelerate launch recipes/finetune.py CONFIG.yaml [--key value ...]``."""

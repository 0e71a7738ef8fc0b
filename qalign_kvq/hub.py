"""Share checkpoints on the Hugging Face Hub: push one with its model card (optionally a LoRA
adapter merged into its base), or fill the local cache with one. Looking checkpoints up by path or
repo id is :mod:`qalign_kvq.resolve` (re-exported here).

    python -m qalign_kvq.hub push DIR --repo-id ORG/NAME [--private] [--merge-lora] [--token T]
    python -m qalign_kvq.hub download ORG/NAME [--revision REV]    # fill the cache, print the path

Exit codes: 0 done, 1 a hub or checkpoint error (the message says which), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from qalign_kvq import __version__
from qalign_kvq.checkpoint import FORMAT_VERSION
from qalign_kvq.loading import load_merged_adapter, load_meta
from qalign_kvq.model_card import write_model_card
from qalign_kvq.plots import RUN_PICTURES
from qalign_kvq.resolve import (  # noqa: F401  (re-exported: the lookup half of the hub API)
    ADAPTER_CONFIG,
    BaseModelNotFoundError,
    CheckpointNotFoundError,
    HubError,
    NotACheckpointError,
    adapter_base_model,
    is_adapter,
    require_checkpoint,
    resolve_base_model,
    resolve_checkpoint,
)

#: Never pushed: the Trainer's intermediate checkpoints, its pickled arguments (scoring needs
#: neither) and half-written temporary files.
IGNORE_PATTERNS = ["checkpoint-*", "training_args.bin", "*.tmp"]
DEFAULT_COMMIT_MESSAGE = "Upload qalign-kvq checkpoint"


class MissingTokenError(HubError):
    """Pushing without a Hugging Face token."""


def merge_lora_checkpoint(directory: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge an adapter checkpoint into its base model (peft ``merge_and_unload``) and save a full
    checkpoint in ``out_dir``: safetensors weights, the adapter's processor, ``qalign_kvq.json``
    with the base model cleared (it stays in ``recipe["base_model"]`` for the model card) and the
    run's pictures."""
    directory, out_dir = Path(directory), Path(out_dir)
    require_checkpoint(directory)
    if not is_adapter(directory):
        raise HubError(f"{directory}: --merge-lora needs a LoRA adapter checkpoint, this one holds full weights")
    meta, family = load_meta(directory)
    base = adapter_base_model(directory, meta)
    merged, processor = load_merged_adapter(directory, meta, family)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    recipe = {**(meta.recipe or {}), "lora_merged": True}
    recipe.setdefault("base_model", base)
    replace(meta, base_model=None, base_revision=None, recipe=recipe, family_options=family.options(),
            format_version=FORMAT_VERSION).save(out_dir)
    for name in RUN_PICTURES:  # the run's pictures, shown by the card
        if (directory / name).is_file():
            shutil.copy2(directory / name, out_dir / name)
    return out_dir


def push_to_hub(directory: str | os.PathLike, repo_id: str, private: bool = False, merge_lora: bool = False,
                token: str | None = None, commit_message: str = DEFAULT_COMMIT_MESSAGE,
                api: HfApi | None = None) -> str:
    """Write the model card (``README.md``) into a checkpoint and upload the checkpoint to ``repo_id``
    (created if needed). With ``merge_lora`` an adapter is first merged into its base model in a
    temporary directory and the merged full model is pushed. Returns the repo URL."""
    directory = Path(directory)
    require_checkpoint(directory)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(f"--repo-id {repo_id!r}: not a valid Hub repo id like ORG/NAME ({err})") from err
    if merge_lora and not is_adapter(directory):
        raise HubError(f"{directory}: --merge-lora needs a LoRA adapter checkpoint, this one holds full weights")
    token = token or (api.token if api is not None else None) or get_token()
    if not token:
        raise MissingTokenError(f"pushing {directory} to {repo_id} needs a Hugging Face token with write access: "
                                "run `hf auth login`, set HF_TOKEN, or pass --token")
    api = api or HfApi(token=token, library_name="qalign-kvq", library_version=__version__)
    with tempfile.TemporaryDirectory(prefix="qalign_kvq_merged_") as tmp:
        folder = merge_lora_checkpoint(directory, tmp) if merge_lora else directory
        write_model_card(folder, repo_id)
        url = api.create_repo(repo_id, token=token, private=True if private else None, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, token=token, commit_message=commit_message,
                          ignore_patterns=list(IGNORE_PATTERNS))
    return str(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qalign_kvq.hub", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="upload a checkpoint directory with its model card")
    push.add_argument("directory", type=Path)
    push.add_argument("--repo-id", required=True, help="ORG/NAME on the Hugging Face Hub")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into its base and push that")
    push.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    push.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)
    download = commands.add_parser("download", help="fetch a checkpoint into the local cache and print its path")
    download.add_argument("repo_id")
    download.add_argument("--revision", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "push":
            url = push_to_hub(args.directory, args.repo_id, private=args.private, merge_lora=args.merge_lora,
                              token=args.token, commit_message=args.commit_message)
            print(f"pushed {args.directory} to {url}")
        else:
            directory = resolve_checkpoint(args.repo_id, revision=args.revision)
            meta = require_checkpoint(directory)
            if is_adapter(directory):
                resolve_base_model(directory, meta)
            print(directory)
    except (HubError, OSError, HfHubHTTPError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

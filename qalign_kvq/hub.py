"""Share checkpoints on the Hugging Face Hub: find one by path or repo id (online, or offline from
the local cache with ``HF_HUB_OFFLINE=1``), and push one with its model card.

    python -m qalign_kvq.hub push DIR --repo-id ORG/NAME [--private] [--merge-lora] [--token T]
    python -m qalign_kvq.hub download ORG/NAME [--revision REV]    # fill the cache, print the path

Exit codes: 0 done, 1 a hub or checkpoint error (the message says which), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from qalign_kvq import __version__
from qalign_kvq.checkpoint import META_FILE, CheckpointMeta
from qalign_kvq.model_card import write_model_card
from qalign_kvq.plots import RUN_PICTURES

ADAPTER_CONFIG = "adapter_config.json"
#: Never pushed: the Trainer's intermediate checkpoints, its pickled arguments (scoring needs
#: neither) and half-written temporary files.
IGNORE_PATTERNS = ["checkpoint-*", "training_args.bin", "*.tmp"]
DEFAULT_COMMIT_MESSAGE = "Upload qalign-kvq checkpoint"


class HubError(Exception):
    """A checkpoint cannot be found, read or pushed; the message says which and why."""


class CheckpointNotFoundError(HubError, FileNotFoundError):
    """Neither a local directory nor a repo id on the Hub (or in the offline cache)."""


class NotACheckpointError(HubError, FileNotFoundError):
    """A directory without ``qalign_kvq.json``."""


class BaseModelNotFoundError(CheckpointNotFoundError):
    """A LoRA adapter whose base model cannot be found."""


class MissingTokenError(HubError):
    """Pushing without a Hugging Face token."""


def _looks_local(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or (os.sep != "/" and os.sep in text)


def resolve_checkpoint(path_or_id: str | os.PathLike, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """A local directory as is; otherwise a Hub repo id, downloaded (or, offline, found in the local
    cache) with :func:`huggingface_hub.snapshot_download`. Returns the directory."""
    text = str(path_or_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotACheckpointError(f"{path}: a file, not a checkpoint directory")
    if _looks_local(text):
        raise CheckpointNotFoundError(f"{text}: no such directory")
    try:
        validate_repo_id(text)
    except HFValidationError as err:
        raise CheckpointNotFoundError(f"{text}: no such directory, and not a Hub repo id like ORG/NAME ({err})") from err
    where = f"revision {revision!r} of " if revision else ""
    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache_dir,
                                      library_name="qalign-kvq", library_version=__version__))
    except GatedRepoError as err:
        raise CheckpointNotFoundError(f"{text}: a gated repository; accept its terms on the Hub and log in "
                                      f"(`hf auth login`)") from err
    except RepositoryNotFoundError as err:
        raise CheckpointNotFoundError(f"{text}: no such directory, and no such model repository on the Hugging Face "
                                      f"Hub (or it is private and no valid token was given)") from err
    except RevisionNotFoundError as err:
        raise CheckpointNotFoundError(f"{text}: the repository has no revision {revision!r}") from err
    except IncompleteSnapshotError as err:
        raise CheckpointNotFoundError(f"{text}: {err}") from err
    except LocalEntryNotFoundError as err:
        cache = cache_dir or constants.HF_HUB_CACHE
        if constants.is_offline_mode():
            raise CheckpointNotFoundError(
                f"{text}: no such directory, and {where}this repo id is not in the local Hugging Face cache "
                f"({cache}) while HF_HUB_OFFLINE is set; download it first with network access "
                f"(`python -m qalign_kvq.hub download {text}`)") from err
        raise CheckpointNotFoundError(f"{text}: the Hub cannot be reached and {where}this repo id is not in the "
                                      f"local cache ({cache}): {err}") from err


def require_checkpoint(directory: str | os.PathLike) -> CheckpointMeta:
    """The :class:`CheckpointMeta` of a qalign-kvq checkpoint directory, or a
    :class:`NotACheckpointError` that says what the directory is instead."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"{directory}: no such directory")
    if not (directory / META_FILE).is_file():
        if (directory / "config.json").is_file():
            what = "a plain transformers model directory"
        elif (directory / ADAPTER_CONFIG).is_file():
            what = "a peft adapter"
        elif not any(directory.iterdir()):
            what = "an empty directory"
        else:
            what = "a directory"
        raise NotACheckpointError(f"{directory}: not a qalign-kvq checkpoint: {what} without {META_FILE} "
                                  f"(training with recipes/finetune.py writes it)")
    return CheckpointMeta.load(directory)


def is_adapter(directory: str | os.PathLike) -> bool:
    """Whether a checkpoint directory holds a peft adapter rather than full weights."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def adapter_base_model(directory: str | os.PathLike, meta: CheckpointMeta) -> str:
    """The base model id/path of an adapter: ``meta.base_model``, else the adapter config's."""
    base = meta.base_model
    config = Path(directory) / ADAPTER_CONFIG
    if not base and config.is_file():
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise BaseModelNotFoundError(f"adapter {directory}: its base model is not recorded (set base_model in "
                                     f"{META_FILE})")
    return base


def resolve_base_model(directory: str | os.PathLike, meta: CheckpointMeta) -> Path:
    """The local directory of an adapter's base model, resolved like any checkpoint (path or repo id)."""
    base = adapter_base_model(directory, meta)
    try:
        return resolve_checkpoint(base)
    except CheckpointNotFoundError as err:
        raise BaseModelNotFoundError(f"adapter {directory}: its base model {base!r} cannot be found: {err}") from err


_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def merge_lora_checkpoint(directory: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge an adapter checkpoint into its base model (peft ``merge_and_unload``) and save a full
    checkpoint in ``out_dir``: safetensors weights, the processor, ``qalign_kvq.json`` with the
    base model cleared (it stays in ``recipe["base_model"]`` for the model card) and the run's
    pictures."""
    from qalign_kvq.families import get_family
    from qalign_kvq.loading import load_merged_adapter  # loading imports this module

    directory, out_dir = Path(directory), Path(out_dir)
    meta = require_checkpoint(directory)
    if not is_adapter(directory):
        raise HubError(f"{directory}: --merge-lora needs a LoRA adapter checkpoint, this one holds full weights")
    base = adapter_base_model(directory, meta)
    merged, processor = load_merged_adapter(directory, meta, get_family(meta.family))
    if any((directory / name).is_file() for name in _PROCESSOR_FILES):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(directory))
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    recipe = {**(meta.recipe or {}), "lora_merged": True}
    recipe.setdefault("base_model", base)
    replace(meta, base_model=None, recipe=recipe).save(out_dir)
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

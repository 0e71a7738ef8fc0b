"""Source-disjoint k-fold ensembles: the folds (disjoint by source, covering the set, balanced,
seeded), their tables and pairs, and ``recipes/kfold.py`` training two tiny models whose written
``infer`` command scores a video with their ensemble."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shlex
import sys
from collections import Counter

import pytest

from qalign_kvq.annotations import read_table
from qalign_kvq.folds import rank_pairs, source_folds, write_folds
from tests.test_training import TINY_RECIPE
from tests.training_support import ROOT, quality_set  # noqa: F401 (fixture)

SOURCES = [f"s{k}" for k in range(6) for _ in range(7)] + ["t"] * 3 + ["u"] * 2 + ["v"]


def _kfold():
    spec = importlib.util.spec_from_file_location("kfold", ROOT / "recipes" / "kfold.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_are_source_disjoint_cover_the_set_and_are_balanced(k):
    folds = source_folds(SOURCES, k, seed=1)
    assert sorted(set(folds)) == list(range(k)) and len(folds) == len(SOURCES)
    for source in set(SOURCES):
        assert len({f for f, s in zip(folds, SOURCES) if s == source}) == 1
    sizes = Counter(folds).values()
    assert max(sizes) - min(sizes) <= 7  # within one source of each other
    assert folds == source_folds(SOURCES, k, seed=1) and folds != source_folds(SOURCES, k, seed=2)
    with pytest.raises(ValueError, match="9 sources cannot make 10 source-disjoint folds"):
        source_folds(SOURCES, 10)


def test_rank_pairs():
    names, scores, sources = ["a1", "a2", "b1", "b2"], [4.0, 2.0, 3.0, 3.0], ["a", "a", "b", "b"]
    homologous = rank_pairs(names, scores, sources, homologous=True)
    assert sorted(tuple(sorted(p[:2])) for p in homologous) == [("a1", "a2")]  # b1/b2 tie: left out
    assert all((p[2] == 1) == (scores[names.index(p[0])] > scores[names.index(p[1])]) for p in homologous)
    assert len(rank_pairs(names, scores, sources, homologous=False)) == 4


def _table_with_sources(tmp_path, root, table):
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "score", "source"])
        for source, rows in table.items():
            writer.writerows([(name, score, source) for name, score in rows])
    return path


def test_fold_tables(quality_set, tmp_path):
    root, table = quality_set
    train = read_table(_table_with_sources(tmp_path, root, table), root)
    folds = write_folds([train], root, tmp_path / "folds", k=3, seed=0)
    held = [set(f.val_sources) for f in folds]
    assert set().union(*held) == set(table) and sum(len(h) for h in held) == len(table)
    for fold in folds:
        val = read_table(fold.val_csv, root)
        rest = read_table(fold.train_csv, root)
        assert set(val["source"]) == set(fold.val_sources) and not set(rest["source"]) & set(val["source"])
        assert len(val) + len(rest) == len(train) == 24 and fold.val_rows == len(val)
        pairs = list(csv.DictReader(fold.homologous_pairs.open()))
        assert len(pairs) == 6 * len(fold.val_sources)  # 4 versions of distinct scores per source
        assert all(p["video1"].split("/")[0] == p["video2"].split("/")[0] for p in pairs)


def test_kfold_trains_k_models_and_writes_the_ensemble_command(tiny_models, quality_set, tmp_path, capsys):
    from qalign_kvq.infer import main as infer

    root, table = quality_set
    train = _table_with_sources(tmp_path, root, {s: table[s] for s in ("bunny_a", "bikes_a", "carphone", "bikes_b")})
    out = tmp_path / "kfold"
    command = [sys.executable, str(ROOT / "recipes" / "finetune.py"), TINY_RECIPE, "--model_name_or_path",
               str(tiny_models("qwen2_5_vl")), "--family", "qwen2_5_vl", "--train_csv", str(train), "--video_root",
               str(root), "--val_csv", "", "--method", "lora", "--max_steps", "2", "--per_device_train_batch_size", "2",
               "--save_strategy", "no", "--eval_strategy", "no", "--load_best_model_at_end", "false",
               "--logging_steps", "1"]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        code = _kfold().main(["--folds", "2", "--output_dir", str(out), "--videos", "test.csv", "--", *command])
    finally:
        for key, value in old.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert code == 0
    summary = json.loads((out / "kfold.json").read_text())
    assert [f["status"] for f in summary["folds"]] == ["trained", "trained"]
    assert summary["mos_range"] == [1.4, 4.6]
    held = [set(f["val_sources"]) for f in summary["folds"]]
    assert held[0] | held[1] == {"bunny_a", "bikes_a", "carphone", "bikes_b"} and not held[0] & held[1]
    for fold in summary["folds"]:  # validated on its held-out fold, its pairs included
        assert set(fold["metrics"]) >= {"SROCC", "PLCC", "Rank1", "Rank2", "Final"}
        meta = json.loads((out / f"fold_{fold['fold']}" / "qalign_kvq.json").read_text())
        assert (meta["mos_low"], meta["mos_high"]) == (1.4, 4.6)
    line = (out / "infer.sh").read_text().splitlines()[-1]
    assert line == (f"python -m qalign_kvq.infer --model {out / 'fold_0'} {out / 'fold_1'} --videos test.csv "
                    "--output predictions.csv")
    # the ensemble scores (one video here, instead of --videos)
    words = shlex.split(line)
    capsys.readouterr()
    assert infer(["--model", *words[words.index("--model") + 1:words.index("--videos")], "--video",
                  str(root / "bikes_c" / "qp30.mp4"), "--frames", "4", "--no-progress"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["models"]) == 2 and 1.4 <= record["score"] <= 4.6
    # a rerun trains nothing again
    assert _kfold().main(["--folds", "2", "--output_dir", str(out), "--", *command]) == 0
    assert [f["status"] for f in json.loads((out / "kfold.json").read_text())["folds"]] == ["trained before"] * 2


def test_kfold_needs_sources(quality_set, tmp_path, capsys):
    root, _ = quality_set
    plain = tmp_path / "plain.csv"
    plain.write_text("filename,score\nbunny_a/qp18.mp4,4.6\nbikes_a/qp46.mp4,1.4\n")
    code = _kfold().main(["--folds", "2", "--", "python", "recipes/finetune.py", TINY_RECIPE, "--train_csv",
                          str(plain), "--video_root", str(root)])
    assert code == 2 and "plain.csv has no source column: write one with python -m qalign_kvq.sources" in \
        capsys.readouterr().err


def test_the_kfold_recipe_command_parses():
    first = (ROOT / "recipes/configs/kvq_qwen2_5_vl_7b_lora_kfold.yaml").read_text().splitlines()[0]
    words = shlex.split(first[2:])
    assert words[:2] == ["python", "recipes/kfold.py"]
    own, command, recipe = _kfold().split_command(words[2:])
    assert own == ["--folds", "5", "--include_val"] and command[:2] == ["accelerate", "launch"]
    assert recipe == ["recipes/configs/kvq_qwen2_5_vl_7b_lora_kfold.yaml"]

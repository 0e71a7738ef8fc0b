"""scripts/prepare_kvq.py on a KVQ-like layout (released CSV + rank-pair xlsx)."""

import csv
import json

import numpy as np
import prepare_kvq
import pytest
from openpyxl import Workbook

from qalign_kvq import evaluate


def _pair_book(path, homologous, nonhomologous):
    book = Workbook()
    book.active.title = "source"
    book.active.append(["video1", "video2", "label"])
    for row in homologous:
        book.active.append(list(row))
    sheet = book.create_sheet("nonsource")
    for row in nonhomologous:
        sheet.append(list(row))
    book.save(path)


def _layout(tmp_path, missing=False):
    root = tmp_path / "KVQ"
    for split, names in (("train", ["0001", "0002", "0003"]), ("val", ["0101", "0102"]),
                         ("test", ["0201", "0202", "0203"])):
        (root / split).mkdir(parents=True)
        for name in names:
            if not (missing and name == "0003"):
                (root / split / f"{name}.mp4").write_bytes(b"x")
    (root / "train_data.csv").write_text("filename,score\ntrain/0001.mp4,1.306\ntrain/0002.mp4,4.5\n"
                                         "train/0003.mp4,3.0\n")
    (root / "truth.csv").write_text("filename,score\nval/0101.mp4,2.0\nval/0102.mp4,3.5\n")
    _pair_book(root / "rank-pair-val.xlsx", [("val/0101.mp4", "val/0102.mp4", 2)], [("val/0102.mp4", "val/0101.mp4", 1)])
    # the challenge's test list (no scores) and the labels released later (every row scored)
    (root / "test_data.csv").write_text("filename,score\ntest/0201.mp4,\ntest/0202.mp4,\ntest/0203.mp4,\n")
    (root / "test_labels.csv").write_text("filename,score\ntest/0201.mp4,4.1\ntest/0202.mp4,1.9\n"
                                          "test/0203.mp4,3.25\n")
    _pair_book(root / "rank-pair-test.xlsx", [("test/0201.mp4", "test/0202.mp4", 1), ("test/0203.mp4", "test/0202.mp4", 1)],
               [("test/0202.mp4", "test/0203.mp4", 2)])
    return root


def test_writes_recipe_csvs_and_reports_levels(tmp_path, capsys):
    root = _layout(tmp_path)
    out = tmp_path / "data"
    code = prepare_kvq.main(["--kvq-root", str(root), "--val", "truth.csv", "--val-pairs-xlsx",
                             "rank-pair-val.xlsx", "--out", str(out), "--check", "exists"])
    assert code == 0
    rows = list(csv.reader((out / "val_pairs_homologous.csv").open()))
    assert rows == [["video1", "video2", "label"], ["val/0101.mp4", "val/0102.mp4", "2"]]
    assert list(csv.reader((out / "val_pairs_nonhomologous.csv").open()))[1] == ["val/0102.mp4", "val/0101.mp4", "1"]
    assert (out / "train.csv").read_text().splitlines()[1] == "train/0001.mp4,1.306"
    printed = capsys.readouterr().out
    assert "1.3060..4.5000" in printed and "1.9448, 2.5836, 3.2224, 3.8612" in printed


def test_missing_video_is_listed_with_exit_code_1(tmp_path, capsys):
    root = _layout(tmp_path, missing=True)
    code = prepare_kvq.main(["--kvq-root", str(root), "--out", str(tmp_path / "data"), "--check", "exists"])
    assert code == 1
    err = capsys.readouterr().err
    assert "train/0003.mp4" in err and "file not found" in err


def test_released_test_labels_and_pairs_give_the_test_metrics(tmp_path, capsys):
    root = _layout(tmp_path)
    out = tmp_path / "data"
    code = prepare_kvq.main(["--kvq-root", str(root), "--test", "test_labels.csv", "--test-pairs-xlsx",
                             "rank-pair-test.xlsx", "--out", str(out), "--check", "exists"])
    assert code == 0
    assert (out / "test.csv").read_text().splitlines() == ["filename,score", "test/0201.mp4,4.1", "test/0202.mp4,1.9",
                                                           "test/0203.mp4,3.25"]
    assert list(csv.reader((out / "test_pairs_homologous.csv").open())) == [
        ["video1", "video2", "label"], ["test/0201.mp4", "test/0202.mp4", "1"], ["test/0203.mp4", "test/0202.mp4", "1"]]
    assert list(csv.reader((out / "test_pairs_nonhomologous.csv").open()))[1:] == [["test/0202.mp4", "test/0203.mp4", "2"]]
    assert "test: 3 rows, with scores" in capsys.readouterr().out
    # the README's flow ends here: a prediction of the test set evaluated with all five metrics
    pred = tmp_path / "prediction.csv"
    pred.write_text("filename,score\ntest/0201.mp4,3.9\ntest/0202.mp4,2.2\ntest/0203.mp4,2.0\n")
    metrics = tmp_path / "metrics.json"
    assert evaluate.main(["--pred", str(pred), "--truth", str(out / "test.csv"), "--pairs-homologous",
                          str(out / "test_pairs_homologous.csv"), "--pairs-nonhomologous",
                          str(out / "test_pairs_nonhomologous.csv"), "--json", str(metrics)]) == 0
    values = json.loads(metrics.read_text())
    assert values["SROCC"] == pytest.approx(0.5) and values["Rank1"] == 0.5 and values["Rank2"] == 0.0
    plcc = float(np.corrcoef([3.9, 2.2, 2.0], [4.1, 1.9, 3.25])[0, 1])
    assert values["PLCC"] == pytest.approx(plcc) and values["Final"] == pytest.approx(0.45 * (0.5 + plcc) + 0.05 * 0.5)


def test_test_list_without_scores_stays_names_only(tmp_path, capsys):
    root = _layout(tmp_path)
    out = tmp_path / "data"
    assert prepare_kvq.main(["--kvq-root", str(root), "--test", "test_data.csv", "--out", str(out),
                             "--check", "exists"]) == 0
    assert (out / "test.csv").read_text().splitlines() == ["filename,score", "test/0201.mp4,", "test/0202.mp4,",
                                                           "test/0203.mp4,"]
    assert not list(out.glob("test_pairs_*")) and "test: 3 rows, names only" in capsys.readouterr().out


@pytest.mark.parametrize("labels, pairs, message", [
    ("filename,score\ntest/0201.mp4,4.1\ntest/0202.mp4,\ntest/0203.mp4,3\n", None, "1 of 3 rows have no score"),
    (None, [("test/0201.mp4", "val/0101.mp4", 1)], "1 homologous pair videos are not in the test CSV, e.g. ['val/0101.mp4']"),
])
def test_bad_test_labels_or_pairs_stop_before_writing(tmp_path, capsys, labels, pairs, message):
    root = _layout(tmp_path)
    if labels:
        (root / "test_labels.csv").write_text(labels)
    if pairs:
        _pair_book(root / "rank-pair-test.xlsx", pairs, [("test/0202.mp4", "test/0203.mp4", 2)])
    out = tmp_path / "data"
    code = prepare_kvq.main(["--kvq-root", str(root), "--test", "test_labels.csv", "--test-pairs-xlsx",
                             "rank-pair-test.xlsx", "--out", str(out), "--check", "exists"])
    assert code == 1 and message in capsys.readouterr().err
    assert not out.exists()

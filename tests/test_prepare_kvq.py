"""scripts/prepare_kvq.py on a KVQ-like layout (released CSV + rank-pair xlsx)."""

import csv

import prepare_kvq
from openpyxl import Workbook


def _layout(tmp_path, missing=False):
    root = tmp_path / "KVQ"
    for split, names in (("train", ["0001", "0002", "0003"]), ("val", ["0101", "0102"])):
        (root / split).mkdir(parents=True)
        for name in names:
            if not (missing and name == "0003"):
                (root / split / f"{name}.mp4").write_bytes(b"x")
    (root / "train_data.csv").write_text("filename,score\ntrain/0001.mp4,1.306\ntrain/0002.mp4,4.5\n"
                                         "train/0003.mp4,3.0\n")
    (root / "truth.csv").write_text("filename,score\nval/0101.mp4,2.0\nval/0102.mp4,3.5\n")
    book = Workbook()
    book.active.title = "source"
    book.active.append(["video1", "video2", "label"])
    book.active.append(["val/0101.mp4", "val/0102.mp4", 2])
    book.create_sheet("nonsource").append(["val/0102.mp4", "val/0101.mp4", 1])
    book.save(root / "rank-pair-val.xlsx")
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

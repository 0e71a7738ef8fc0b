"""Annotation tables: CSV/JSONL parsing, levels, path safety, missing/unreadable rows, rank pairs."""

import json
import shutil

import numpy as np
import pytest

from qalign_kvq.annotations import (
    AnnotationError,
    MissingVideosError,
    UnsafePathError,
    add_levels,
    balance,
    check_videos,
    read_rank_pairs,
    read_table,
    resolve_video_path,
)
from qalign_kvq.levels import LevelScale


def _write(path, text):
    path.write_text(text)
    return path


def test_kvq_csv_columns_levels_and_paths(tmp_path):
    csv = _write(tmp_path / "train_data.csv", "filename,score\ntrain/0001.mp4,3.3611\ntrain/0002.mp4,1.31\n"
                                              "train/0003.mp4,4.5\ntrain/0004.mp4,2.0\n")
    table = read_table(csv, tmp_path)
    assert table.column_names == ["filename", "score", "path"]
    assert table["path"][0] == str((tmp_path / "train/0001.mp4").resolve())
    scale = LevelScale.from_scores(table["score"])
    assert (scale.low, scale.high) == (1.31, 4.5)
    table = add_levels(table, scale)
    # width 0.638: edges 1.948, 2.586, 3.224, 3.862
    assert table["level"] == [4, 1, 5, 2]
    assert table["level_word"] == ["good", "bad", "excellent", "poor"]
    assert table["level_score"][1] == pytest.approx(1.0) and table["level_score"][2] == pytest.approx(5.0)


def test_std_column_gives_soft_labels_with_the_mos_as_expectation(tmp_path):
    csv = _write(tmp_path / "a.csv", "filename,score,std\na.mp4,1,0.5\nb.mp4,3.2,0.8\nc.mp4,5,0.1\n")
    table = add_levels(read_table(csv, tmp_path), LevelScale(1, 5), soft_labels=True)
    probs = np.array(table["soft_label"])
    assert probs.shape == (3, 5)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)
    expected = probs @ np.array([5, 4, 3, 2, 1])
    np.testing.assert_allclose(expected, table["level_score"], atol=1e-6)
    assert probs[1].min() > 1e-4  # a Gaussian spread over every level, not a two-level split


def test_jsonl_table(tmp_path):
    lines = [{"video": "x/a.mp4", "mos": 2.5}, {"filename": "x/b.mp4", "score": 4.0, "std": 0.3}]
    path = _write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    table = read_table(path, tmp_path)
    assert table["filename"] == ["x/a.mp4", "x/b.mp4"]
    assert table["score"] == [2.5, 4.0]
    assert table["std"] == [None, 0.3]


@pytest.mark.parametrize("text, message", [
    ("name,score\na.mp4,1\n", "no filename column"),
    ("filename,value\na.mp4,1\n", "no score column"),
    ("filename,score\na.mp4,abc\n", "line 2: score 'abc' is not a number"),
    ("filename,score\na.mp4,nan\n", "line 2: score 'nan' is not finite"),
    ("filename,score\na.mp4,1\na.mp4,2\n", "line 3: duplicate filename 'a.mp4'"),
    ("filename,score\na.mp4,\n", "empty score"),
    ("filename,score\n", "no rows"),
])
def test_bad_csv_is_refused_with_file_and_reason(tmp_path, text, message):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(AnnotationError, match=message) as info:
        read_table(path, tmp_path)
    assert str(path) in str(info.value)


def test_test_split_without_scores_reads_when_scores_are_not_required(tmp_path):
    path = _write(tmp_path / "test.csv", "filename,score\ntest/1.mp4,\n")
    assert read_table(path, tmp_path, require_scores=False)["score"] == [None]


@pytest.mark.parametrize("name", ["../secret.mp4", "a/../../secret.mp4", "/etc/passwd"])
def test_paths_escaping_the_video_root_are_refused(tmp_path, name):
    root = tmp_path / "videos"
    root.mkdir()
    with pytest.raises(UnsafePathError, match="escapes the video root"):
        resolve_video_path(root, name)
    csv = _write(tmp_path / "a.csv", f"filename,score\nok.mp4,1\n{name},2\n")
    with pytest.raises(UnsafePathError):
        read_table(csv, root)


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError):
        resolve_video_path(root, "link/x.mp4")
    assert resolve_video_path(root, "sub/../x.mp4") == (root / "x.mp4").resolve()


def test_missing_and_unreadable_rows_are_all_reported_before_training(tmp_path, sample_video):
    root = tmp_path / "v"
    root.mkdir()
    shutil.copy(sample_video, root / "good.mp4")
    (root / "text.mp4").write_text("not a video at all")
    csv = _write(tmp_path / "a.csv", "filename,score\ngood.mp4,3\ngone1.mp4,2\ntext.mp4,4\ngone2.mp4,1\n")
    table = read_table(csv, root)
    with pytest.raises(MissingVideosError) as info:
        check_videos(table, str(csv))
    err = info.value
    assert [name for name, _ in err.problems] == ["gone1.mp4", "text.mp4", "gone2.mp4"]
    assert f"{csv}: 3 rows have a missing or unreadable video" in str(err)
    assert "gone1.mp4: file not found" in str(err)
    # 'exists' only looks at files: the text file passes, the missing ones do not
    with pytest.raises(MissingVideosError) as info:
        check_videos(table, str(csv), readable=False)
    assert [name for name, _ in info.value.problems] == ["gone1.mp4", "gone2.mp4"]
    check_videos(table.select([0]), str(csv))  # a clean table passes


def test_balance_equalises_levels(tmp_path):
    rows = "".join(f"v{i}.mp4,{s}\n" for i, s in enumerate([1, 1.1, 1.2, 1.3, 5, 3]))
    table = add_levels(read_table(_write(tmp_path / "a.csv", "filename,score\n" + rows), tmp_path), LevelScale(1, 5))
    balanced = balance(table, seed=0)
    levels, counts = np.unique(balanced["level"], return_counts=True)
    assert levels.tolist() == [1, 3, 5] and counts.tolist() == [4, 4, 4]
    assert set(balanced["filename"]) == set(table["filename"])
    assert balance(table, seed=0)["filename"] == balanced["filename"]


def test_rank_pairs_must_name_known_videos(tmp_path):
    homo = _write(tmp_path / "h.csv", "video1,video2,label\na.mp4,b.mp4,1\n")
    non = _write(tmp_path / "n.csv", "video1,video2,label\na.mp4,zzz.mp4,2\n")
    pairs = read_rank_pairs(str(homo), None, known=["a.mp4", "b.mp4"])
    assert pairs.homologous == [("a.mp4", "b.mp4", 1)] and pairs.nonhomologous is None
    with pytest.raises(AnnotationError, match="n.csv: 1 videos are not in the table"):
        read_rank_pairs(str(homo), str(non), known=["a.mp4", "b.mp4"])

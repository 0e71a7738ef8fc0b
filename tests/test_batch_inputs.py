"""What ``--videos`` names: the video files of a folder (recursively), a CSV's column, files."""

from __future__ import annotations

import pytest

from qalign_kvq.batch_inputs import UsageError, collect_inputs


def test_a_folder_gives_its_video_files_in_order(tmp_path):
    folder = tmp_path / "set"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.mp4", "a.MOV", "sub/c.ts", "d.h264", "notes.txt", "e.mp4.part"):
        (folder / name).write_bytes(b"")
    # raw H.264 elementary streams are read (tests/test_video_reader.py) and so listed too
    assert [name for name, _ in collect_inputs([str(folder)])] == ["a.MOV", "b.mp4", "d.h264", "sub/c.ts"]


def test_a_csv_names_files_beside_it_and_duplicates_count_once(tmp_path):
    (tmp_path / "list.csv").write_text("score,filename\n3.1,x.mp4\n2.0,y.mp4\n2.0,x.mp4\n")
    items = collect_inputs([str(tmp_path / "list.csv"), str(tmp_path / "z.mp4")])
    assert items == [("x.mp4", tmp_path / "x.mp4"), ("y.mp4", tmp_path / "y.mp4"),
                     (str(tmp_path / "z.mp4"), tmp_path / "z.mp4")]
    with pytest.raises(UsageError, match="no such CSV file"):
        collect_inputs([str(tmp_path / "missing.csv")])

"""``python -m qalign_kvq.sources``: the practice set's sources (sandwich layouts, clips cut from one
video, every KVQ-style processing) and the test clips' sources recovered exactly; the table written
back with every column and a source column that training reads; unreadable videos reported."""

from __future__ import annotations

import csv
import json

import make_demo_data as demo
import pytest

from qalign_kvq.annotations import AnnotationError, read_table
from qalign_kvq.sources import group_videos, main
from tests.training_support import SOURCES, quality_set  # noqa: F401 (fixture)

# The first 7 catalogue sources: blurred-copy and black-bar sandwiches, portrait photos, and two clips
# of Big Buck Bunny (bunny_a, bunny_b) that must stay apart.
PRACTICE_SOURCES = 7


def _partition(labels):
    groups = {}
    for name, label in labels.items():
        groups.setdefault(label, set()).add(name)
    return sorted(sorted(g) for g in groups.values())


@pytest.fixture(scope="module")
def practice_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("practice")
    manifest = demo.build(out, num_sources=PRACTICE_SOURCES, seed=0, jobs=2, num_frames=4)
    table = out / "all.csv"  # every split in one table: harder than one split at a time
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "score", "std"])
        writer.writerows([(row["filename"], row["score"], 0.1) for row in manifest])
    return out, table, {row["filename"]: row["source"] for row in manifest}


def test_recovers_the_practice_set_sources_exactly(practice_set, capsys):
    root, table, truth = practice_set
    out = root / "with_sources.csv"
    assert main(["--annotations", str(table), "--root", str(root), "--output", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["filename", "score", "std", "source"]
    assert [r["filename"] for r in rows] == list(truth)
    assert _partition({r["filename"]: r["source"] for r in rows}) == _partition(truth)
    assert rows[0]["source"] == rows[0]["filename"].removesuffix(".mp4")  # named after the group's first video
    report = json.loads((root / "with_sources.csv.sources.json").read_text())
    assert report["groups"] == PRACTICE_SOURCES and report["largest_group"] == 7 and report["singletons"] == 0
    assert report["max_within_group"] < report["threshold"] < report["min_across_groups"]
    assert f"{7 * PRACTICE_SOURCES} of {7 * PRACTICE_SOURCES} videos in {PRACTICE_SOURCES} sources" in \
        capsys.readouterr().out
    # training reads the column
    loaded = read_table(out, root)
    assert loaded["source"] == [r["source"] for r in rows]


def test_recovers_the_test_clip_sources_exactly(quality_set):
    root, table = quality_set
    names = [name for rows in table.values() for name, _ in rows]
    grouping = group_videos(names, [root / n for n in names])
    assert _partition(dict(zip(names, grouping.source_names()))) == _partition(
        {n: n.split("/")[0] for n in names})
    assert len(set(grouping.source_names())) == len(SOURCES)


def test_unreadable_videos_are_reported_and_left_without_a_source(practice_set, tmp_path, capsys):
    root, _, truth = practice_set
    (root / "broken.mp4").write_bytes(b"not a video")
    bad = tmp_path / "bad.jsonl"
    names = list(truth) + ["broken.mp4"]
    bad.write_text("".join(json.dumps({"video": n, "mos": 3.0, "note": "x"}) + "\n" for n in names))
    out = tmp_path / "bad_sources.jsonl"
    assert main(["--annotations", str(bad), "--root", str(root), "--output", str(out), "--no-progress",
                 "--report", str(tmp_path / "report.json")]) == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert _partition({r["video"]: r["source"] for r in records[:-1]}) == _partition(truth)
    assert records[-1]["source"] == "" and records[0]["note"] == "x"
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["unreadable"]) == ["broken.mp4"] and report["groups"] == PRACTICE_SOURCES
    assert "unreadable: broken.mp4" in capsys.readouterr().err
    with pytest.raises(AnnotationError, match=f"bad_sources.jsonl: line {len(names)}: empty source"):
        read_table(out, root)

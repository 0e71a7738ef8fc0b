"""``python -m qalign_kvq.report``: a batch scored by ``python -m qalign_kvq.infer`` (tiny model, real
clips, one broken file) becomes one self-contained page, opened in headless Chromium (Debian's
package, installed by ``make test`` like ffmpeg): the rows it draws are sorted as the address asks,
the errors are listed, a video that cannot be read gets a placeholder."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qalign_kvq import infer, report
from qalign_kvq.checkpoint import CheckpointMeta
from qalign_kvq.report import RecordsError, load_records

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CLIPS = ["landscape", "portrait", "sandwich_blur", "sandwich_black", "rotated", "vfr"]


@pytest.fixture(scope="module")
def batch(tiny_models, video_corpus, broken_videos, tmp_path_factory):
    """``(root, records)``: six real clips and a text file posing as a video under ``root/test``,
    scored by infer (2 frames) into ``records``."""
    torch.set_num_threads(2)
    base = tmp_path_factory.mktemp("report")
    folder = base / "videos" / "test"
    folder.mkdir(parents=True)
    for name in CLIPS:
        shutil.copy(video_corpus[name], folder / f"{name}.mp4")
    shutil.copy(broken_videos["text_as_mp4"], folder / "broken.mp4")
    model = base / "model"
    shutil.copytree(tiny_models("qwen2_vl"), model)
    CheckpointMeta(family="qwen2_vl", mos_low=1.31, mos_high=4.5).save(model)
    records = base / "scores.jsonl"
    code = infer.main(["--videos", str(base / "videos"), "--model", str(model), "--output", str(records),
                       "--frames", "2", "--no-progress"])
    assert code == 1  # the broken file failed, the others were scored
    return base / "videos", records


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def chromium(args, tmp_path, timeout=120):
    assert CHROMIUM, "chromium is not installed: run `make chromium` (apt-get install chromium)"
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class Dom(HTMLParser):
    """The rows and the error table of a dumped page."""

    def __init__(self):
        super().__init__()
        self.rows, self.errors, self.missing, self.images, self.body = [], [], [], [], {}
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "body":
            self.body = attrs
        if tag == "div" and "row" in classes and "data-file" in attrs:
            self.rows.append(attrs)
        if tag == "tr" and "data-file" in attrs:
            self.errors.append([attrs["data-file"]])
            self._cell = self.errors[-1]
        if "thumb" in classes:
            (self.missing if "missing" in classes else self.images).append(attrs)

    def handle_data(self, data):
        if self._cell is not None and data.strip():
            self._cell.append(data.strip())

    def handle_endtag(self, tag):
        if tag == "tr":
            self._cell = None


def _dom(page, tmp_path, fragment=""):
    dom = Dom()
    dom.feed(chromium(["--dump-dom", page.as_uri() + fragment], tmp_path))
    return dom


def test_records_are_read_as_infer_writes_them(batch, tmp_path):
    _, records = batch
    rows, errors, words = load_records(records)
    written = _records(records)
    assert [r.file for r in rows] == [r["file"] for r in written if "error" not in r]
    assert words == ["excellent", "good", "fair", "poor", "bad"]
    first = next(r for r in written if "error" not in r)
    assert rows[0].score == first["score"] and rows[0].uncertainty == first["uncertainty"]
    assert rows[0].probs == [first["probs"][w] for w in words]
    assert errors == [{"file": "test/broken.mp4", "error": next(r["error"] for r in written if "error" in r)}]
    # the CSV output of infer points to the records kept beside it
    csv = tmp_path / "pred.csv"
    shutil.copy(records, tmp_path / "pred.csv.jsonl")
    csv.write_text("filename,score\n")
    assert [r.file for r in load_records(csv)[0]] == [r.file for r in rows]
    (tmp_path / "pred.csv.jsonl").unlink()
    with pytest.raises(RecordsError, match="pred.csv.jsonl"):
        load_records(csv)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(records.read_text().splitlines()[0] + "\n{\"file\": \"x.mp4\", \"score\": 3}\n")
    with pytest.raises(RecordsError, match=r"bad.jsonl:2: x.mp4: no 'probs'"):
        load_records(bad)
    bad.write_text("not json\n")
    with pytest.raises(RecordsError, match="bad.jsonl:1: not a JSON record"):
        load_records(bad)


def test_page_in_chromium_sorts_rows_and_lists_errors(batch, tmp_path, capsys):
    root, records = batch
    page = tmp_path / "out" / "report.html"
    assert report.main([str(records), "--root", str(root), "--output", str(page), "--no-progress"]) == 0
    assert "6 scored videos (0 without thumbnail), 1 errors" in capsys.readouterr().err
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", text)  # self-contained
    assert text.count('"thumb":"data:image/webp;base64,') == len(CLIPS)
    scored = [r for r in _records(records) if "error" not in r]

    def order(key, reverse):  # ties keep the input (records) order
        return [r["file"] for r in sorted(scored, key=lambda r: r[key], reverse=reverse)]

    default = _dom(page, tmp_path)
    assert [r["data-file"] for r in default.rows] == order("score", False)  # worst score first
    assert default.body["data-sort"] == "score" and len(default.images) == len(CLIPS) and not default.missing
    assert all(img["loading"] == "lazy" and img["src"].startswith("data:image/webp;base64,") for img in default.images)
    error_text = next(r["error"] for r in _records(records) if "error" in r)
    assert default.errors == [["test/broken.mp4", "test/broken.mp4", error_text]]

    by_uncertainty = _dom(page, tmp_path, "#sort=uncertainty")
    assert [r["data-file"] for r in by_uncertainty.rows] == order("uncertainty", True)  # least sure first
    values = [float(r["data-uncertainty"]) for r in by_uncertainty.rows]
    assert values == sorted(values, reverse=True)
    assert [r["data-file"] for r in _dom(page, tmp_path, "#sort=score&order=desc").rows] == order("score", True)
    filtered = _dom(page, tmp_path, "#sort=file&q=sandwich")
    assert [r["data-file"] for r in filtered.rows] == ["test/sandwich_black.mp4", "test/sandwich_blur.mp4"]

    shot = tmp_path / "report.png"
    chromium([f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars", "--virtual-time-budget=3000",
              page.as_uri() + "#sort=uncertainty"], tmp_path)
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (1280, 900)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    # the level bars are drawn: the "excellent" green and the "bad" red of the page's palette are on screen
    for color in ((0x1A, 0x98, 0x50), (0xD7, 0x30, 0x27)):
        assert (np.abs(pixels - color).sum(axis=2) < 12).sum() > 50
    shutil.copy(shot, Path(records).parent / "report_screenshot.png")  # kept beside the batch for a look


def test_unreadable_video_gets_a_placeholder_and_exit_code_1(batch, tmp_path, capsys):
    root, records = batch
    moved = tmp_path / "root"
    shutil.copytree(root, moved)
    (moved / "test" / "portrait.mp4").write_bytes(b"")  # the video went bad after it was scored
    page = tmp_path / "report.html"
    assert report.main([str(records), "--root", str(moved), "--output", str(page), "--no-progress",
                        "--sort", "uncertainty"]) == 1
    err = capsys.readouterr().err
    assert "(1 without thumbnail)" in err and "no thumbnail: test/portrait.mp4:" in err
    dom = _dom(page, tmp_path)
    assert dom.body["data-sort"] == "uncertainty"
    assert [m.get("title") for m in dom.missing] == ["the file is empty (0 bytes)"] and len(dom.images) == len(CLIPS) - 1
    assert len(dom.rows) == len(CLIPS)


def test_usage_errors_exit_2_and_write_nothing(batch, tmp_path, capsys):
    _, records = batch
    page = tmp_path / "report.html"
    assert report.main([str(tmp_path / "none.jsonl"), "--output", str(page)]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        report.main([str(records), "--root", str(tmp_path / "nowhere"), "--output", str(page)])
    assert info.value.code == 2
    assert not page.exists()

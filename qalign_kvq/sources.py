"""Group the videos of an annotation table by content: which ones are versions of one source.

    python -m qalign_kvq.sources --annotations train.csv --root DIR --output train_sources.csv

KVQ's file names do not say which videos share a source. Every video gets a signature: the
low-frequency 2-D DCT coefficients (16x16, DC left out) of ``--frames`` evenly spaced frames,
each frame in grey and shrunk to 32x32 by area averaging, which scaling, blur, noise,
sharpening and x264 quantisation barely move. The coefficients are partly whitened over the
table (each principal direction divided by ``sqrt(variance + its mean)``), so that structure many
videos share (a sandwich layout's bars, a typical frame) counts little, and two videos' distance
is ``1 - cosine`` of their signatures, averaged over the frames: near 0 for versions of one
source, near 1 for unrelated videos. Average-linkage clustering cut at ``--threshold`` makes the
groups. Distances are relative to the table's own variety, so run it on a whole table (a split,
or all splits together), not on a handful of videos. The table is written back (atomically, every column kept) with a ``source`` column
naming each group after its first video, and a JSON report beside it: the groups, their
tightest and loosest distances and the closest pairs across groups, to check the cut.

Unreadable videos are listed in the report and keep an empty ``source`` (exit code 1); training
refuses a table with empty sources. Exit code 0: every video grouped; 2: usage or file error.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SIDE = 32  # frames shrunk to SIDE x SIDE before the DCT
KEEP = 16  # the KEEP x KEEP lowest frequencies, DC left out
DEFAULT_FRAMES = 6
DEFAULT_THRESHOLD = 0.6
MIN_VIDEOS = 30  # fewer videos give a poor estimate of the table's variety (see content_distances)


def frame_signature(frame: np.ndarray) -> np.ndarray:
    """``(KEEP * KEEP - 1,)`` low-frequency DCT coefficients of one RGB frame (grey, SIDE x SIDE)."""
    from PIL import Image
    from scipy.fft import dctn

    grey = Image.fromarray(np.ascontiguousarray(frame)).convert("L").resize((SIDE, SIDE), Image.Resampling.BOX)
    coefficients = dctn(np.asarray(grey, dtype=np.float64), norm="ortho")[:KEEP, :KEEP]
    return coefficients.ravel()[1:]


def video_signature(path: str | os.PathLike, frames: int = DEFAULT_FRAMES) -> np.ndarray:
    """``(frames, KEEP * KEEP - 1)``: the signatures of ``frames`` evenly spaced frames of a video."""
    from qalign_kvq.video import probe, read_frames, uniform_indices

    clip = read_frames(path, uniform_indices(probe(path).num_frames, frames))
    return np.stack([frame_signature(frame) for frame in clip])


def content_distances(signatures: np.ndarray) -> np.ndarray:
    """``(N, N)`` distances of ``(N, frames, d)`` signatures: ``1 - cosine`` of the partly whitened
    coefficients, averaged over the frames (0 = the same picture, about 1 = unrelated)."""
    n, k, d = signatures.shape
    flat = signatures.reshape(n * k, d)
    mean = flat.mean(axis=0)
    centred = signatures - mean
    if n * k > 1:
        variances, directions = np.linalg.eigh(np.cov(flat, rowvar=False))
        variances = np.clip(variances, 0.0, None)
        whitened = centred @ (directions / np.sqrt(variances + variances.mean() + 1e-12))
    else:
        whitened = centred
    unit = whitened / np.maximum(np.linalg.norm(whitened, axis=-1, keepdims=True), 1e-12)
    similarity = np.einsum("ikd,jkd->ij", unit, unit) / k
    distances = np.clip(1.0 - similarity, 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    return (distances + distances.T) / 2


def cluster(distances: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Group labels ``0..G-1`` (numbered by first member) from average-linkage clustering whose
    groups have a mean pairwise distance of at most ``threshold``."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = distances.shape[0]
    if n == 1:
        return np.zeros(1, dtype=int)
    raw = fcluster(linkage(squareform(distances, checks=False), method="average"), t=threshold, criterion="distance")
    order = {label: i for i, label in enumerate(dict.fromkeys(raw.tolist()))}
    return np.array([order[label] for label in raw.tolist()])


@dataclass
class Grouping:
    """What :func:`group_videos` found: a label per video (``-1``: unreadable) and the report."""

    names: list[str]
    labels: np.ndarray
    distances: np.ndarray | None
    errors: dict[str, str] = field(default_factory=dict)

    def source_names(self) -> list[str]:
        """Each video's source: the name of its group's first video without the extension ('' if unreadable)."""
        first: dict[int, str] = {}
        for name, label in zip(self.names, self.labels.tolist()):
            if label >= 0:
                first.setdefault(label, str(Path(name).with_suffix("")))
        return [first[label] if label >= 0 else "" for label in self.labels.tolist()]

    def report(self, threshold: float, closest: int = 10) -> dict:
        """Groups (members, loosest pair), the closest pairs across groups and the unreadable videos."""
        sources = self.source_names()
        ok = np.flatnonzero(self.labels >= 0)
        groups = {}
        for label in dict.fromkeys(self.labels[ok].tolist()):
            members = ok[self.labels[ok] == label]
            inner = self.distances[np.ix_(members, members)] if self.distances is not None else np.zeros((1, 1))
            groups[sources[members[0]]] = {"size": int(members.size), "max_distance": round(float(inner.max()), 4),
                                          "members": [self.names[i] for i in members]}
        pairs = []
        if self.distances is not None and ok.size > 1:
            sub = self.distances[np.ix_(ok, ok)]
            labels = self.labels[ok]
            i, j = np.triu_indices(ok.size, 1)
            across = labels[i] != labels[j]
            order = np.argsort(sub[i, j][across])[:closest]
            pairs = [{"a": self.names[ok[i[across][o]]], "b": self.names[ok[j[across][o]]],
                      "distance": round(float(sub[i, j][across][o]), 4)} for o in order]
        sizes = [g["size"] for g in groups.values()]
        notes = []
        if ok.size < MIN_VIDEOS:
            notes.append(f"only {ok.size} videos: distances are relative to the table's variety, groups may split")
        return {
            "videos": len(self.names), "grouped": int(ok.size), "groups": len(groups), "threshold": threshold,
            "singletons": sum(s == 1 for s in sizes), "largest_group": max(sizes, default=0),
            "max_within_group": max((g["max_distance"] for g in groups.values()), default=0.0),
            "min_across_groups": pairs[0]["distance"] if pairs else None,
            "closest_pairs_across_groups": pairs, "unreadable": dict(self.errors), "notes": notes,
            "sources": groups,
        }


def group_videos(names: Sequence[str], paths: Sequence[str | os.PathLike], frames: int = DEFAULT_FRAMES,
                 threshold: float = DEFAULT_THRESHOLD, jobs: int = 2, progress: bool = False) -> Grouping:
    """Signatures of every video (``jobs`` read in parallel; an unreadable one is recorded and left
    out), their distances and the groups."""
    from qalign_kvq.video import VideoError

    def one(path):
        try:
            return video_signature(path, frames), None
        except (VideoError, OSError, ValueError) as err:
            return None, getattr(err, "reason", None) or str(err)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        results = pool.map(one, paths)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(paths), desc="signatures", unit="video")
        results = list(results)
    errors = {name: err for name, (_, err) in zip(names, results) if err is not None}
    good = [i for i, (sig, _) in enumerate(results) if sig is not None]
    labels = np.full(len(names), -1, dtype=int)
    distances = None
    if good:
        sub = content_distances(np.stack([results[i][0] for i in good]))
        labels[good] = cluster(sub, threshold)
        distances = np.full((len(names), len(names)), np.nan)
        distances[np.ix_(good, good)] = sub
    return Grouping(list(names), labels, distances, errors)


# ----- the table ---------------------------------------------------------------------------
def _read_records(path: Path) -> tuple[list[dict], list[str] | None]:
    """The table's records with every column (``None`` header for JSONL)."""
    if path.suffix.lower() in (".jsonl", ".json"):
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()], None
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        return list(reader), list(reader.fieldnames or [])


def write_with_sources(annotations: str | os.PathLike, output: str | os.PathLike, sources: dict[str, str]) -> Path:
    """Write ``annotations`` to ``output`` (same format, atomically) with a ``source`` column
    (replacing one already there) filled from ``sources`` (filename -> source)."""
    from qalign_kvq.annotations import FILE_KEYS, _pick

    src, out = Path(annotations), Path(output)
    records, header = _read_records(src)
    names = header if header is not None else list(records[0]) if records else []
    file_key = _pick(FILE_KEYS, names, "filename", str(src))
    buffer = io.StringIO()
    if header is None:
        for record in records:
            buffer.write(json.dumps({**record, "source": sources.get(str(record[file_key]).strip(), "")}) + "\n")
    else:
        columns = [c for c in header if c.strip().lower() != "source"] + ["source"]
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({**record, "source": sources.get((record.get(file_key) or "").strip(), "")})
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(buffer.getvalue())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qalign_kvq.sources", description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", required=True, help="CSV or JSONL table (filename column; scores optional)")
    parser.add_argument("--root", required=True, help="folder the filenames are relative to")
    parser.add_argument("--output", required=True, help="table to write, with the source column")
    parser.add_argument("--report", help="JSON report of the groups (default: <output>.sources.json)")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help=f"frames per video (default {DEFAULT_FRAMES})")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"largest mean distance within a group, 0..2 (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--jobs", type=int, default=2, help="videos read in parallel")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from qalign_kvq.annotations import AnnotationError, read_table

    if args.frames < 1 or not 0 < args.threshold < 2:
        print("error: --frames must be >= 1 and --threshold in (0, 2)", file=sys.stderr)
        return 2
    try:
        table = read_table(args.annotations, args.root, require_scores=False)
    except AnnotationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    grouping = group_videos(table["filename"], table["path"], args.frames, args.threshold, args.jobs,
                            progress=not args.no_progress)
    out = write_with_sources(args.annotations, args.output, dict(zip(grouping.names, grouping.source_names())))
    report = grouping.report(args.threshold)
    report_path = Path(args.report) if args.report else out.with_name(out.name + ".sources.json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['grouped']} of {report['videos']} videos in {report['groups']} sources "
          f"(largest {report['largest_group']}, {report['singletons']} alone); largest distance within a source "
          f"{report['max_within_group']}, smallest across sources {report['min_across_groups']} (threshold "
          f"{args.threshold}); wrote {out} and {report_path}")
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    for name, reason in grouping.errors.items():
        print(f"unreadable: {name}: {reason}", file=sys.stderr)
    return 1 if grouping.errors else 0


if __name__ == "__main__":
    sys.exit(main())

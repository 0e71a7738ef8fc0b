"""The records of a batch scoring run: one JSON line per video (``{"file", ...}`` or ``{"file",
"error"}``), appended one complete line at a time and fsync'ed, so a kill loses at most the video in
flight; under several processes each appends to ``<records>.part<rank>`` and process 0 merges.

Several processes need ``<records>``'s folder on storage they all share (one folder, seen by every
node): :func:`check_shared_folder` proves it before anything is scored, and :func:`tally` finds
every input without a record at the end (a part file process 0 cannot see)."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path


class RecordsError(ValueError):
    """A records file that is not what infer writes: the message names the file and the line."""


def records_path(output: Path) -> Path:
    """Where the full records live: the output itself (JSONL) or ``<output>.jsonl`` beside a CSV."""
    return output if output.suffix.lower() != ".csv" else output.with_name(output.name + ".jsonl")


def parse_records(lines: Iterable[str], path: Path | str) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` of each non-blank line (``where``: ``path:line``); a line that is not a
    JSON object with a ``file`` name raises :class:`RecordsError` naming it."""
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordsError(f"{where}: not a JSON record ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("file"), str) or not record["file"]:
            raise RecordsError(f"{where}: expected an object with a 'file' name")
        yield where, record


def read_records(path: Path) -> list[dict]:
    """Complete records of a JSONL file (a last line without newline, from a kill, is ignored); a
    line that is not a record raises :class:`RecordsError`."""
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")[:-1]  # only newline-terminated lines
    return [record for _, record in parse_records(lines, path)]


def repair_tail(path: Path) -> None:
    """Cut a half-written last line (no trailing newline) off a records file."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())


def append_record(path: Path, record: dict) -> None:
    """Append one record as one complete line in a single write, then fsync."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _jsonl(records: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_submission_csv(output: Path, records: Sequence[dict]) -> None:
    """``filename,score`` of every scored record, in record order (error records left out)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["filename", "score"])
    for record in records:
        if "error" not in record:
            writer.writerow([record["file"], repr(float(record["score"]))])
    write_text_atomic(output, buf.getvalue())


def part_path(records: Path, rank: int) -> Path:
    return records.with_name(f"{records.name}.part{rank}")


def part_files(records: Path) -> list[Path]:
    return sorted(records.parent.glob(f"{records.name}.part*"))


def drop_errors(records: Path, names: Sequence[str]) -> None:
    """Remove the error records of ``names`` (to score them again)."""
    names = set(names)
    kept = [r for r in read_records(records) if not ("error" in r and r["file"] in names)]
    write_text_atomic(records, _jsonl(kept))


def merge_parts(records: Path, order: dict[str, int], parts: Sequence[Path] | None = None) -> list[dict]:
    """Merge the part files (default: all beside ``records``) into ``records`` in one atomic write:
    names already there are kept, names not in ``order`` (older runs) first, then input order; then
    remove the parts. A kill leaves the old records and the parts, or the new records. Returns them."""
    parts = part_files(records) if parts is None else [p for p in parts if p.is_file()]
    current = read_records(records)
    done = {r["file"] for r in current}
    merged = list(current)
    for record in (r for part in parts for r in read_records(part)):
        if record["file"] not in done:
            merged.append(record)
            done.add(record["file"])
    merged.sort(key=lambda r: order.get(r["file"], -1))  # stable: older names first, then input order
    if merged != current:
        write_text_atomic(records, _jsonl(merged))
    for part in parts:
        part.unlink()
    return merged


def tally(records: Path, names: Sequence[str], world_size: int = 1) -> dict:
    """What the records (and the part files of ``world_size`` processes, opened by name) hold for
    ``names``: ``{"scored": n, "errors": [records], "missing": [names without any record]}``."""
    sources = [records, *(part_path(records, r) for r in range(world_size) if world_size > 1)]
    found: dict[str, dict] = {}
    for path in sources:  # the first record of a name wins, as in merge_parts
        for record in read_records(path):
            found.setdefault(record["file"], record)
    errors = [found[n] for n in names if n in found and "error" in found[n]]
    missing = [n for n in names if n not in found]
    return {"scored": len(names) - len(errors) - len(missing), "errors": errors, "missing": missing}


def check_shared_folder(folder: Path, token: str) -> str | None:
    """Whether process 0 sees the files every process writes into ``folder``: each writes a marker
    file named after ``token`` (the same on every process), process 0 looks for them all. Returns,
    on every process, None or the reason the folder is not shared. Every process must call it."""
    from qalign_kvq.distributed import all_gather, broadcast, rank_and_size

    rank, world_size = rank_and_size()
    marker = folder / f".qalign_kvq-shared-{token}.rank{rank}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(socket.gethostname())
        wrote = None
    except OSError as err:
        wrote = f"{type(err).__name__}: {err}"
    hosts = all_gather((socket.gethostname(), wrote))  # also: every marker is written before process 0 looks
    unseen = None
    if rank == 0:
        unseen = [r for r in range(1, world_size) if not (folder / f".qalign_kvq-shared-{token}.rank{r}").is_file()]
    unseen = broadcast(unseen)
    marker.unlink(missing_ok=True)
    failed = [f"process {r} ({hosts[r][0]}) cannot write there: {hosts[r][1]}" for r in range(world_size) if hosts[r][1]]
    failed += [f"process 0 ({hosts[0][0]}) does not see the files process {r} ({hosts[r][0]}) writes there"
               for r in unseen if not hosts[r][1]]
    return "; ".join(failed) or None

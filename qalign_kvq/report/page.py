"""The report page: scored rows as a JSON blob that the page's script draws and sorts, the errors
as a plain table, everything inline (no file or network access when it is opened)."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files

SORT_KEYS = ("score", "uncertainty", "file", "input")


@dataclass
class Row:
    """One scored video as the page shows it; ``probs`` in the order of the page's words."""

    index: int
    file: str
    score: float
    score_1_5: float
    uncertainty: float
    probs: list[float]
    thumb: str | None = None
    thumb_size: tuple[int, int] | None = None
    thumb_error: str | None = None


def _json_for_script(value) -> str:
    """JSON that cannot end the ``<script>`` element it sits in."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def _errors_html(errors: Sequence[dict]) -> str:
    if not errors:
        return '<h2>Errors</h2>\n<p class="none">Every video was scored.</p>'
    lines = [f"<h2>{len(errors)} video{'s' if len(errors) != 1 else ''} could not be scored</h2>",
             '<table class="errors"><thead><tr><th>file</th><th>error</th></tr></thead><tbody>']
    for record in errors:
        lines.append(f'<tr data-file="{html.escape(str(record["file"]))}"><td>{html.escape(str(record["file"]))}</td>'
                     f'<td>{html.escape(str(record["error"]))}</td></tr>')
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _summary_html(rows: Sequence[Row], errors: Sequence[dict], source: str) -> str:
    parts = [f"{len(rows)} scored, {len(errors)} failed"]
    if rows:
        scores = [r.score for r in rows]
        parts.append(f"score {min(scores):.3f} .. {max(scores):.3f}, mean {sum(scores) / len(scores):.3f}")
    missing = sum(1 for r in rows if r.thumb is None)
    if missing:
        parts.append(f"{missing} without preview")
    return " &middot; ".join(html.escape(p) for p in parts) + f" &middot; from <code>{html.escape(source)}</code>"


def render_page(rows: Sequence[Row], errors: Sequence[dict], words: Sequence[str], title: str, source: str,
                default_sort: str = "score", row_height: int = 80, thumb_width: int = 320) -> str:
    """The whole HTML page as text; thumbnails fit a ``thumb_width`` x ``row_height`` box."""
    if default_sort not in SORT_KEYS:
        raise ValueError(f"default sort {default_sort!r}: not one of {SORT_KEYS}")
    data = {"words": list(words), "default_sort": default_sort,
            "rows": [{k: v for k, v in vars(r).items() if v is not None} for r in rows]}
    template = files("qalign_kvq.report").joinpath("template.html").read_text(encoding="utf-8")
    values = {"TITLE": html.escape(title), "ROW_HEIGHT": str(int(row_height)), "THUMB_WIDTH": str(int(thumb_width)),
              "SUMMARY": _summary_html(rows, errors, source), "ERRORS": _errors_html(errors),
              "DATA": _json_for_script(data)}
    return re.sub(r"@@([A-Z_]+)@@", lambda match: values[match.group(1)], template)  # one pass: values stay as is

"""One self-contained HTML file of a run: the table, the plots, the provenance and the
resolved config, for a pull request or a chat.

Self-contained means no request leaves the file: styles are inline, plots are PNG data
URIs, and nothing links to a script, font or image elsewhere.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any

import pandas as pd

from ..results import TRAINED_STATUSES, LoadedRun
from .frame import MemoryMeasure, accuracy_columns
from .plots import png_bytes, run_charts
from .table import ALLOCATED_HEADER, allocated_text, provenance_lines, row_texts, shows_allocated, table_notes

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 70rem;
       color: #1b1b1b; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.35rem 0.6rem; text-align: right; }
th:first-child, td:first-child, td.status { text-align: left; }
th { background: #f3f3f3; }
tr.pareto td:first-child { font-weight: 600; }
tr.failed td { color: #a00; }
td.status { white-space: normal; max-width: 24rem; }
img { max-width: 100%; height: auto; display: block; margin: 1rem 0; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 1rem; overflow-x: auto; font-size: 0.8rem; }
.note { color: #555; font-size: 0.85rem; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(frame: pd.DataFrame, measure: MemoryMeasure) -> str:
    accuracy = accuracy_columns(frame)
    allocated = shows_allocated(frame)
    head = ["cell", measure.label, "x baseline", *([ALLOCATED_HEADER] if allocated else []), "time / epoch", "x baseline",
            accuracy.accuracy.shown_as.long, "Δ points", accuracy.second.shown_as.long, "status"]
    rows = []
    for row in frame.itertuples(index=False):
        classes = ["pareto"] if row.pareto else []
        status = "ok" if row.status == "ok" else f"{row.status}: {row.reason or ''}"
        if row.status not in TRAINED_STATUSES:
            rows.append(f'<tr class="failed"><td>{_esc(row.cell)}</td>' + "<td>-</td>" * (8 if allocated else 7)
                        + f'<td class="status">{_esc(status)}</td></tr>')
            continue
        texts = list(row_texts(row, accuracy))
        if allocated:
            texts.insert(2, allocated_text(row))
        rows.append(f'<tr class="{" ".join(classes)}"><td>{_esc(row.cell)}</td>'
                    + "".join(f"<td>{_esc(text)}</td>" for text in texts) + f'<td class="status">{_esc(status)}</td></tr>')
    header = "".join(f"<th>{_esc(text)}</th>" for text in head)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _markdown_bold_to_html(line: str) -> str:
    """provenance_lines() writes '- **key:** text' with `code`; keep the emphasis, escape the rest."""
    text = _esc(line.removeprefix("- "))
    for marker, tag in (("**", "strong"), ("`", "code")):
        parts = text.split(marker)
        text = "".join(part if i % 2 == 0 else f"<{tag}>{part}</{tag}>" for i, part in enumerate(parts))
    return f"<li>{text}</li>"


def table_section(frame: pd.DataFrame, measure: MemoryMeasure) -> str:
    """The table and the notes under it: the part of the report a notebook shows for a run."""
    notes = table_notes(frame) + (["cells on the Pareto frontier are in bold"] if frame["pareto"].sum() > 1 else [])
    return f'{_table(frame, measure)}\n<ul class="note">{"".join(f"<li>{_esc(note)}</li>" for note in notes)}</ul>'


def _cell_notes(run: LoadedRun) -> str:
    return "".join(
        f"<li><strong>{_esc(result.cell)}:</strong> {_esc(note)}</li>"
        for result in run.results for note in result.notes
    )


#: The class a notebook's fragment lives in: its styles apply inside it only, never to the notebook.
NOTEBOOK_SCOPE = "gputech-bench-report"
#: The report's rules that style the table and its notes (not the page: body, headings, images).
_TABLE_RULES = ("table", "th", "td", "tr", ".note")


def scoped_style(scope: str = NOTEBOOK_SCOPE) -> str:
    """STYLE's table rules, each selector prefixed with ``.scope``: the same look as the report."""
    rules = []
    for rule in STYLE.split("}"):
        if "{" not in rule:
            continue
        selectors, body = rule.split("{", 1)
        chosen = [s.strip() for s in selectors.split(",") if s.strip().startswith(_TABLE_RULES)]
        if chosen:
            rules.append(", ".join(f".{scope} {selector}" for selector in chosen) + " {" + body + "}")
    return "\n".join(rules)


def notebook_html(run: LoadedRun, frame: pd.DataFrame, measure: MemoryMeasure, baseline: str = "baseline") -> str:
    """A run as a notebook shows it: the report's table and notes (the same renderer as
    ``report --format html``) in a block whose styles do not leak into the notebook."""
    notes = _cell_notes(run)
    return (
        f'<div class="{NOTEBOOK_SCOPE}"><style>{scoped_style()}</style>'
        f"<p><strong>{_esc(f'gputech-bench: {run.root.name}')}</strong> "
        f'<span class="note">({_esc(run.root)}; baseline for the ratios: {_esc(baseline)})</span></p>'
        f"{table_section(frame, measure)}"
        + (f'<ul class="note">{notes}</ul>' if notes else "")
        + "</div>"
    )


def html_report(run: LoadedRun, frame: pd.DataFrame, measure: MemoryMeasure, baseline: str = "baseline") -> str:
    title = f"gputech-bench: {run.root.name}"
    plots = "".join(
        f'<figure><img alt="{_esc(name)}" src="data:image/png;base64,{base64.b64encode(png_bytes(chart)).decode()}">'
        f"</figure>"
        for name, chart in run_charts(run, baseline).items()
    )
    cell_notes = _cell_notes(run)
    config = json.dumps(run.config, indent=2) if run.config is not None else "(config.json missing)"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{_esc(title)}</h1>
<p class="note">Baseline for the ratios: {_esc(baseline)}. Made by <code>gputech-bench report --format html</code>.</p>
{table_section(frame, measure)}
<h2>Plots</h2>
{plots}
<h2>Notes per cell</h2>
<ul class="note">{cell_notes or "<li>none</li>"}</ul>
<h2>Provenance</h2>
<ul>{"".join(_markdown_bold_to_html(line) for line in provenance_lines(run.results, measure))}</ul>
<h2>Resolved config</h2>
<pre>{html.escape(config, quote=False)}</pre>
</body>
</html>
"""

"""Self-contained HTML reports (figures inlined), with the same numbers as JSON and CSV.

Example
-------
>>> rep = Report(title="Demo", data_label="synthetic replica")
>>> rep.rows.append({"model": "WS-DINO", "weak_label": "compound", "nsc": 0.9, "nscb": 0.8})
>>> paths = write_report(rep, "out/")          # doctest: +SKIP
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_wsdino.core.fsio import atomic_write_text

SYNTHETIC_LABEL = "synthetic replica"


@dataclass
class Report:
    """What a report shows.

    Attributes
    ----------
    title
        Page heading.
    data_label
        What the numbers were computed on (``"synthetic replica"`` is shown as a banner:
        results on it are never BBBC021 results).
    rows
        Results table, one dict per model (keys become columns).
    sections
        Extra tables: ``{heading: list of row dicts}`` (per-MoA accuracy, ...).
    figures
        ``{caption: PNG bytes}``, inlined as base64.
    settings
        Run settings and data fingerprint, shown at the end and stored in the JSON.
    """

    title: str
    data_label: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    sections: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1.0001 and v == v else f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0}.banner{background:#fff3cd;border:1px solid #e0c060;padding:.6em 1em}
figure{display:inline-block;margin:1em}img{max-width:520px}pre{background:#f7f7f7;padding:1em}
"""


def render_html(report: Report) -> str:
    """The report as one HTML page with no external resources."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}"
             f"</title><style>{_CSS}</style></head><body><h1>{html.escape(report.title)}</h1>"]
    label = html.escape(report.data_label)
    if report.data_label == SYNTHETIC_LABEL:
        parts.append(f"<p class='banner'>Computed on the <b>{label}</b> (generated images "
                     "following BBBC021's design), not on the real BBBC021 images.</p>")
    else:
        parts.append(f"<p>Data: <b>{label}</b></p>")
    parts += [f"<p>{html.escape(n)}</p>" for n in report.notes]
    parts.append("<h2>Results</h2>" + _table(report.rows))
    for heading, rows in report.sections.items():
        parts.append(f"<h2>{html.escape(heading)}</h2>" + _table(rows))
    if report.figures:
        parts.append("<h2>Figures</h2>")
        for caption, png in report.figures.items():
            b64 = base64.b64encode(png).decode()
            parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("<h2>Settings</h2><pre>" + html.escape(json.dumps(report.settings, indent=2, default=str))
                 + "</pre></body></html>")
    return "\n".join(parts)


def write_report(report: Report, out_dir: str | Path, stem: str = "report") -> dict[str, Path]:
    """Write ``<stem>.html``, ``<stem>.json`` and ``<stem>.csv`` (the results table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / f"{stem}.html", "json": out / f"{stem}.json", "csv": out / f"{stem}.csv"}
    atomic_write_text(paths["html"], render_html(report))
    atomic_write_text(paths["json"], json.dumps({
        "title": report.title, "data": report.data_label, "results": report.rows,
        "sections": report.sections, "settings": report.settings, "notes": report.notes,
        "figures": sorted(report.figures),
    }, indent=2, default=str))
    cols = list(dict.fromkeys(k for r in report.rows for k in r))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=cols)
    writer.writeheader()
    writer.writerows(report.rows)
    atomic_write_text(paths["csv"], table.getvalue())
    return paths

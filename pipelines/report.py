"""`report.html`: one self-contained page per output (inline CSS, JS and images; no network), written at the end of
every run and by `latentray report OUT`.

It shows the run (stage, when, how long, rows by status, throughput, code version, checkpoints), the failures by
error code with example keys (all of them in `report-failures.csv` beside it), a histogram and the worst and best
rows of each metric column with their row previews, the output's preview images (the stages' own views: edit grids,
faces x styles, channel charts, DCI matrices, ...), the result tables of population stages and the run history.

It scales with the output: the metric columns are read part by part (only those columns, twice: range, then
counts), galleries keep N rows (ops/summaries.py), and only the gallery rows' previews are read.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io as bytes_io
import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ops.redact import redact
from ops.summaries import Extremes, Histogram, metric_direction
from pipelines import index, io

REPORT = "report.html"
FAILURES_CSV = "report-failures.csv"
GALLERY = 12  # worst and best rows shown per metric
BINS = 30
EXAMPLES = 5  # example keys per error code
RESULT_ROWS = 200  # rows of a result table shown
ROW_PREVIEW = "row_preview"  # per row: its preview columns side by side, small JPEG (written by the driver)


@dataclass
class Metric:
    column: str
    higher_is_better: bool
    histogram: Histogram
    extremes: Extremes

    def summary(self) -> dict:
        h = self.histogram
        return {"column": self.column, "higher_is_better": self.higher_is_better, "n": h.n,
                "non_finite": h.non_finite, "mean": h.mean(), "min": h.lo, "max": h.hi, "edges": h.edges().tolist(), "counts": h.counts.tolist(),
                "worst": self.extremes.worst(self.higher_is_better), "best": self.extremes.best(self.higher_is_better)}


@dataclass
class Facts:
    """Everything the page shows, gathered from the output."""

    output: str
    run: dict
    stats: dict
    by_status: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)  # [{code, status, count, message, examples}]
    failures_csv: bytes = b""
    metrics: list = field(default_factory=list)
    previews_of_rows: dict = field(default_factory=dict)  # key -> JPEG bytes
    preview_columns: list = field(default_factory=list)  # what a row preview shows, left to right
    images: list = field(default_factory=list)  # (name, PNG bytes) from previews/
    results: dict = field(default_factory=dict)  # result table name -> (columns, rows, total rows)


# ----- gathering ----------------------------------------------------------------------------------------------------
def part_columns(output: str, part: str) -> pa.Schema:
    import pyarrow.parquet as pq

    fs, path = io.join(output, part)
    with fs.open(path, "rb") as f:
        return pq.read_schema(f)


def collect(output: str, gallery: int = GALLERY, bins: int = BINS, examples: int = EXAMPLES) -> Facts:
    run = io.read_json(output, "run.json")
    if run is None:
        raise FileNotFoundError(f"{output}: no run.json, so not a latentray output (or its first run has not "
                                "started)")
    facts = Facts(redact(output), run, io.read_json(output, "stats.json") or {})
    state = index.load(output)
    if state.winners is not None and len(state.winners):
        gather_rows(facts, output, state, gallery, bins, examples)
    facts.images = preview_images(output)
    for name in facts.stats.get("results", {}):
        facts.results[name] = result_table(output, name)
    return facts


def gather_rows(facts: Facts, output: str, state: index.State, gallery: int, bins: int, examples: int) -> None:
    w = state.winners
    counted = w.group_by("status").aggregate([("key", "count")])
    facts.by_status = dict(zip(counted.column("status").to_pylist(), counted.column("key_count").to_pylist()))
    failing = w.filter(pc.not_equal(w.column("status"), "ok")).column("key").to_pylist()
    schema = part_columns(output, next(iter(state.parts)))
    if failing:
        gather_failures(facts, output, state, sorted(failing), schema, examples)
    metrics = [Metric(f.name, metric_direction(f.name), Histogram(bins), Extremes(gallery)) for f in schema
               if pa.types.is_floating(f.type) and metric_direction(f.name) is not None]
    if not metrics:
        return
    reads = index.plan_reads(state)
    columns = ["key", "status", *(m.column for m in metrics)]
    for first_pass in (True, False):
        for part, keep in reads:
            table = index.read_columns(output, part, keep, columns)
            ok = pc.equal(table.column("status"), "ok").to_numpy(zero_copy_only=False)
            keys = table.column("key").filter(pa.array(ok))
            for m in metrics:
                values = table.column(m.column).to_numpy(zero_copy_only=False).astype(np.float64)[ok]
                if first_pass:
                    m.histogram.extend(values)
                    rows = m.extremes.candidates(values)
                    m.extremes.add(values[rows], np.asarray(keys.take(pa.array(rows)).to_pylist(), dtype=object))
                else:
                    m.histogram.add(values)
    facts.metrics = [m.summary() for m in metrics]
    if ROW_PREVIEW in schema.names:
        facts.preview_columns = io.table_metadata(schema).get("row_preview_columns", [])
        shown = sorted({k for m in facts.metrics for _, k in (*m["worst"], *m["best"])})
        for part, keys in index.plan_reads(state, shown):
            table = index.read_rows(output, part, keys, [ROW_PREVIEW])
            facts.previews_of_rows.update((k, v) for k, v in zip(table.column("key").to_pylist(),
                                                                 table.column(ROW_PREVIEW).to_pylist()) if v)


def gather_failures(facts: Facts, output: str, state: index.State, keys: list[str], schema: pa.Schema,
                    examples: int) -> None:
    """Counts by (status, error code), the first example keys and message of each, and every failing row as CSV."""
    columns = [c for c in ("key", "status", "error_code", "error", "uri") if c in schema.names]
    groups: dict = {}
    buffer = bytes_io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for part, keep in index.plan_reads(state, keys):
        table = index.read_columns(output, part, keep, columns)
        for row in table.to_pylist():
            writer.writerow([row[c] for c in columns])
            group = groups.setdefault((row["status"], row["error_code"]), {"count": 0, "rows": []})
            group["count"] += 1
            group["rows"].append((row["key"], row.get("error", "")))
            group["rows"] = sorted(group["rows"])[:examples]
    facts.failures_csv = buffer.getvalue().encode()
    facts.failures = [{"status": s, "code": c or "(none)", "count": g["count"], "message": g["rows"][0][1],
                       "examples": [k for k, _ in g["rows"]]}
                      for (s, c), g in sorted(groups.items(), key=lambda item: (-item[1]["count"], item[0]))]


def preview_images(output: str) -> list[tuple[str, bytes]]:
    fs, folder = io.join(output, "previews")
    names = sorted(n for n in io.listing(fs, folder) if n.endswith(".png"))
    return [(n, io.fetch(fs, posixpath.join(folder, n))) for n in names]


def result_table(output: str, name: str) -> tuple[list, list, int]:
    fs, path = io.join(output, name)
    table = io.parse_table(io.fetch(fs, path), path)
    shown = table.slice(0, RESULT_ROWS)
    columns = [c for c in shown.column_names if not isinstance(shown.column(c).type, pa.FixedShapeTensorType)]
    return columns, [[row[c] for c in columns] for row in shown.select(columns).to_pylist()], len(table)


# ----- the page -------------------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}th.sort{cursor:pointer}th.sort:after{content:" \\2195";color:#999}
.num{text-align:right;font-variant-numeric:tabular-nums}.ok{color:#176}.failed{color:#a21}.skipped{color:#a60}
.pair{display:flex;gap:24px;flex-wrap:wrap}.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0}figcaption{font-size:12px;color:#555}
svg .bar{fill:#4a6fb0}svg text{font-size:11px;fill:#444}details{margin:6px 0}pre{background:#f7f7f7;padding:8px;
overflow:auto;max-height:320px}img{image-rendering:pixelated}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th.sort').forEach(function(th, col){
    th.addEventListener('click', function(){
      var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var up = th.getAttribute('data-dir') !== 'asc';
      th.setAttribute('data-dir', up ? 'asc' : 'desc');
      var idx = th.cellIndex;
      rows.sort(function(a, b){
        var x = a.cells[idx].getAttribute('data-v'), y = b.cells[idx].getAttribute('data-v');
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : (x < y ? -1 : x > y ? 1 : 0);
        return up ? c : -c;
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
});
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def when(seconds) -> str:
    if not seconds:
        return "?"
    return datetime.datetime.fromtimestamp(float(seconds), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def data_uri(data: bytes, kind: str) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def cell(value, numeric: bool = False) -> str:
    if isinstance(value, float):
        shown = f"{value:.4g}"
    else:
        shown = value
    return f'<td class="{"num" if numeric else ""}" data-v="{esc(value)}">{esc(shown)}</td>'


def table(headers: list[str], rows: list[list], sortable: bool = True, numeric: set | None = None,
          cls: str = "") -> str:
    numeric = numeric or set()
    head = "".join(f'<th class="{"sort" if sortable else ""}">{esc(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(v if isinstance(v, Raw) else cell(v, i in numeric) for i, v in enumerate(row))
                   + "</tr>" for row in rows)
    return f'<table class="{"sortable " if sortable else ""}{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Raw(str):
    """A table cell already rendered as HTML."""


def histogram_svg(m: dict, width: int = 420, height: int = 120) -> str:
    counts, edges = m["counts"], m["edges"]
    top = max(counts) or 1
    bar = width / len(counts)
    rects = []
    for i, c in enumerate(counts):
        h = (height - 20) * c / top
        rects.append(f'<rect class="bar" data-count="{c}" data-lo="{edges[i]:.6g}" data-hi="{edges[i + 1]:.6g}" '
                     f'x="{i * bar:.1f}" y="{height - 16 - h:.1f}" width="{max(bar - 1, 1):.1f}" height="{h:.1f}">'
                     f'<title>{edges[i]:.4g} to {edges[i + 1]:.4g}: {c}</title></rect>')
    labels = (f'<text x="0" y="{height - 2}">{edges[0]:.4g}</text>'
              f'<text x="{width}" y="{height - 2}" text-anchor="end">{edges[-1]:.4g}</text>')
    return (f'<svg class="histogram" data-column="{esc(m["column"])}" data-n="{m["n"]}" width="{width}" '
            f'height="{height}" role="img">{"".join(rects)}{labels}</svg>')


def gallery(facts: Facts, m: dict, which: str) -> str:
    rows = []
    for rank, (value, key) in enumerate(m[which], 1):
        strip = facts.previews_of_rows.get(key)
        image = Raw(f'<td><img alt="{esc(key)}" src="{data_uri(strip, "image/jpeg")}"></td>' if strip else "<td>-</td>")
        rows.append([rank, key, float(value), image])
    shows = " | ".join(shown_as(c) for c in facts.preview_columns) or "preview"
    return table(["rank", "key", m["column"], shows], rows, numeric={0, 2}, cls=f"gallery {which}")


def shown_as(column: str) -> str:
    """A preview column as people call it."""
    from ops.latents import SPACE_COLUMNS

    name = column.removeprefix("recon_")
    if column == "image":
        return "aligned"
    return f"{name} reconstruction" if column.startswith("recon_") and name in SPACE_COLUMNS else name


def metrics_overview(metrics: list[dict]) -> str:
    rows = [[Raw(f'<td><a href="#metric-{esc(m["column"])}">{esc(m["column"])}</a></td>'),
             "higher" if m["higher_is_better"] else "lower", m["n"], m["non_finite"], m["mean"], m["min"], m["max"]]
            for m in metrics]
    return table(["column", "better", "rows", "no value", "mean", "min", "max"], rows, numeric={2, 3, 4, 5, 6},
                 cls="metrics")


def render(facts: Facts, failures_link: str | None) -> str:
    run, stats = facts.run, facts.stats
    last = (run.get("runs") or [{}])[-1]
    stage = run.get("stage", stats.get("stage", "?"))
    parts = [f"<h1>{esc(stage)}: {esc(facts.output)}</h1>"]
    status = ", ".join(f'<span class="{esc(s)}">{n} {esc(s)}</span>' for s, n in sorted(facts.by_status.items()))
    head = [["stage", esc(stage)], ["started", when(last.get("started"))], ["finished", when(last.get("finished"))],
            ["run time", f"{stats.get('seconds', 0):.1f} s" if "seconds" in stats else "unfinished"],
            ["rows in the output", Raw(f"<td>{status or 'none'}</td>")],
            ["rows this run", stats.get("rows_processed", "-")],
            ["throughput", f"{stats['rows_per_second']:.3g} rows/s" if "rows_per_second" in stats else "-"],
            ["code version", last.get("code_version", "?")],
            ["fingerprint", run.get("fingerprint", "?")]]
    for name, sha in {**(run.get("checkpoints_sha256") or {}), **(run.get("prepare_checkpoints") or {})}.items():
        head.append([f"checkpoint {name}", sha])
    parts.append(table(["", ""], head, sortable=False, cls="header"))
    parts.append(f"<details><summary>configuration</summary><pre>{esc(json.dumps(run.get('config'), indent=1))}"
                 "</pre></details>")

    parts.append("<h2>Failures</h2>")
    if facts.failures:
        rows = [[f["status"], f["code"], f["count"], f["message"], ", ".join(f["examples"])] for f in facts.failures]
        parts.append(table(["status", "error code", "rows", "message (first example)", "example keys"], rows,
                           numeric={2}, cls="failures"))
        if failures_link:
            parts.append(f'<p><a href="{esc(failures_link)}" download>every failed or skipped row (CSV)</a></p>')
    else:
        parts.append("<p>None.</p>")

    if facts.metrics:
        parts.append("<h2>Metrics</h2>" + metrics_overview(facts.metrics))
    for m in facts.metrics:
        better = "higher is better" if m["higher_is_better"] else "lower is better"
        parts.append(f'<h2 id="metric-{esc(m["column"])}">{esc(m["column"])} ({better})</h2>')
        parts.append(f"<p>{m['n']} ok rows with a value" +
                     (f", {m['non_finite']} without (NaN or infinite)" if m["non_finite"] else "") + "</p>")
        parts.append(histogram_svg(m))
        parts.append(f'<div class="pair"><div><h3>worst {len(m["worst"])}</h3>{gallery(facts, m, "worst")}</div>'
                     f'<div><h3>best {len(m["best"])}</h3>{gallery(facts, m, "best")}</div></div>')

    for name, (columns, rows, total) in facts.results.items():
        parts.append(f"<h2>{esc(name)}</h2><p>{total} rows{f', first {len(rows)} shown' if total > len(rows) else ''}"
                     "</p>")
        numeric = {i for i, c in enumerate(columns) if rows and isinstance(rows[0][i], (int, float))}
        parts.append(table(columns, rows, numeric=numeric, cls="result"))

    if facts.images:
        parts.append("<h2>Previews</h2><div class=\"grid\">")
        for name, data in facts.images:
            parts.append(f'<figure><img class="preview" alt="{esc(name)}" src="{data_uri(data, "image/png")}">'
                         f"<figcaption>previews/{esc(name)}</figcaption></figure>")
        parts.append("</div>")

    parts.append("<h2>Run history</h2>")
    history = []
    for i, r in enumerate(run.get("runs", []), 1):
        if "overwritten" in r:
            history.append([i, "(an earlier configuration, overwritten)", "", "", "", ""])
            continue
        history.append([i, when(r.get("started")), when(r.get("finished")), r.get("host", ""),
                        r.get("code_version", ""), " ".join(map(str, r.get("argv", [])))])
    parts.append(table(["run", "started", "finished", "host", "code version", "command"], history, numeric={0},
                       cls="history"))
    return ("<!doctype html><html><head><meta charset=\"utf-8\">"
            f"<title>{esc(stage)} report</title><style>{CSS}</style></head><body>{''.join(parts)}"
            f"<script>{SORT_JS}</script></body></html>")


def write(output: str, to: str | None = None, gallery: int = GALLERY) -> str:
    """Write the report of `output` beside it (or into `to`); returns where the page is."""
    facts = collect(output, gallery)
    target = to or output
    link = None
    if facts.failures_csv:
        io.write_bytes(target, FAILURES_CSV, facts.failures_csv)
        link = FAILURES_CSV
    io.write_bytes(target, REPORT, render(facts, link).encode())
    return f"{target.rstrip('/')}/{REPORT}"

"""The report's index.html: one page that opens offline (plotly.js from the plotly.min.js beside
it, the folder's only copy) and links every file of the results folder; plus the HTML of one chart
section and small table helpers."""

from __future__ import annotations

import html
import json
from datetime import datetime

from .. import __version__
from ..study import start_comparison
from .figures import Chart

PLOTLY_JS = "plotly.min.js"  # the report folder's one copy of plotly.js: index.html and charts/ load it

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1300px;padding:0 24px 60px;color:#222}
h1{margin:24px 0 4px}h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 10px;text-align:left;font-size:14px}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#555;font-size:14px}.muted{color:#888}nav a{margin-right:14px}
.chart{border:1px solid #eee;margin:10px 0;padding:4px}code{background:#f4f4f4;padding:1px 4px}
"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return json.dumps(v)
    return "-" if v is None else str(v)


def _table(rows: list[tuple[str, object]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def chart_html(chart: Chart) -> str:
    """A chart's section of index.html: the figure (plotly.js comes from the page) or why it is missing."""
    head = f'<section id="{chart.name}"><h2>{html.escape(chart.title)}</h2>'
    if chart.fig is None:
        return head + f'<p class="note muted">{html.escape(chart.note or "not available")}</p></section>'
    div = chart.fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{chart.name}",
                            config={"displaylogo": False, "responsive": True})
    note = f'<p class="note">{html.escape(chart.note)}</p>' if chart.note else ""
    return (head + note + f'<div class="chart">{div}</div>'
            f'<p class="note"><a href="charts/{chart.name}.html">open this chart alone</a></p></section>')


def _summary_rows(s: dict) -> list[tuple[str, object]]:
    states = ", ".join(f"{n} {k}" for k, n in s["states"].items() if n)
    info = s.get("dataset_info") or {}
    return [
        ("study", s["study"]), ("storage", s["storage"]),
        ("dataset", f"{s['dataset']} ({info.get('train', '?')} train / {info.get('validation', '?')} validation / "
                    f"{info.get('test', '?')} test images; subset {s['subset']})"),
        ("epoch budget per trial", s["epochs"]), ("seed", s["seed"]), ("created", s["created"]),
        ("trials", f"{s['trials']} ({states})"),
        ("best validation accuracy", f"{s['best_value']:.4f} (trial {s['best_trial']})"),
        ("best starting configuration", _start_text(s)),
        ("total compute time", f"{_duration(s['trial_seconds_total'])} summed over trials; "
                               f"{_duration(s['wall_seconds'])} wall clock from first start to last finish"),
        ("devices", ", ".join(s["devices"]) or "-"),
    ]


def _start_text(s: dict) -> str:
    start = s.get("best_start")
    if start is None:
        return "none completed (the study ran no [[start]] configuration, or none finished its budget)"
    if start["lead"] <= 0:
        return f"validation {start['value']:.4f} (trial {start['trial']}, [[start]] {start['start']}): the best so far"
    return start_comparison(s).removeprefix("best start: ")


def _head(s: dict, charts: list[Chart]) -> list[str]:
    return [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>hpsearch report: {html.escape(s['study'])}</title><style>{_CSS}</style>",
        f"<script type='text/javascript' src='{PLOTLY_JS}'></script></head><body>",
        f"<h1>hpsearch report: {html.escape(s['study'])}</h1>",
        f"<p class='note'>Generated {html.escape(datetime.now().astimezone().isoformat(timespec='seconds'))} "
        f"by hpsearch {__version__} from the study's storage; objective: validation accuracy "
        f"({html.escape(s['direction'])}).</p>",
        "<nav>" + "".join(f"<a href='#{c.name}'>{html.escape(c.name.replace('_', ' '))}</a>" for c in charts) + "</nav>",
    ]


def _per_class_table(per_class: list[dict]) -> str:
    return ("<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>" +
            "".join(f"<tr><td>{html.escape(c['class'])}</td><td class='num'>{c['precision']:.4f}</td>"
                    f"<td class='num'>{c['recall']:.4f}</td><td class='num'>{c['f1']:.4f}</td>"
                    f"<td class='num'>{c['support']}</td></tr>" for c in per_class) + "</table>")


def _test_section(b: dict) -> list[str]:
    """The best model (kept by the search, or retrained) on the test split, from best.json."""
    return [
        "<h2 id='test'>Best model on the test split</h2>",
        f"<p class='note'>{html.escape(b['training'])}.</p>",
        _table([("test accuracy", f"{b['test_accuracy']:.4f} ({b['test_correct']} / {b['test_total']})"),
                ("test loss", b["test_loss"]),
                (f"validation accuracy ({'kept by the search' if b.get('trained_by') == 'search' else 'retrained'})",
                 b["validation_accuracy"]),
                ("validation accuracy (in the study)", b["study_validation_accuracy"]),
                ("macro F1", b["macro_avg"]["f1"]), ("parameters", f"{b['param_count']:,}"),
                ("seed", b["seed"]), ("training time", _duration(b["retrain_seconds"]))]),
        _per_class_table(b["per_class"]),
    ]


def render_index(summary: dict, charts: list[Chart], importances: dict, evaluator_label: str,
                 best_json: dict | None, files: list[str]) -> str:
    """index.html: summary, best parameters, the retrained model's test results (when `best_json`
    is given), the list of files and every chart."""
    parts = _head(summary, charts)
    parts += ["<h2 id='summary'>Summary</h2>", _table(_summary_rows(summary)),
              "<h2>Best parameters</h2>", _table(list(summary["best_params"].items()))]
    if importances:
        note = summary.get("importance", {}).get("note", "")
        parts += [f"<p class='note'>Importance ({html.escape(evaluator_label)}): " +
                  ", ".join(f"{html.escape(k)} {v:.3f}" for k, v in importances.items()) +
                  (f". {html.escape(note)}" if note else "") + "</p>"]
    if best_json is not None:
        parts += _test_section(best_json)
    parts += ["<h2>Files</h2><ul>" + "".join(f"<li><a href='{html.escape(f)}'>{html.escape(f)}</a></li>" for f in files)
              + "</ul>"]
    if best_json is not None:
        parts += ["<p class='note'>Load the model with <code>from hpsearch import load_model; "
                  "model = load_model('best_model.pt')</code>: float images in [0, 1], [N, 1, 28, 28] in, "
                  "logits out.</p>"]
    parts += [chart_html(c) for c in charts]
    parts += ["</body></html>"]
    return "\n".join(parts)

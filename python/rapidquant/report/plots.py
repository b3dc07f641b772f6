"""Matplotlib helpers that return figures as base64 PNG for self-contained HTML."""
from __future__ import annotations

import base64
import html
import io


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def fig_to_img(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    pyplot().close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def bar_chart(labels, series: dict, title: str, ylabel: str, hlines: dict | None = None) -> str:
    plt = pyplot()
    import numpy as np
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(labels) + 2), 3.8))
    x = np.arange(len(labels))
    w = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + i * w - 0.4 + w / 2, vals, w, label=name)
    for name, (y, style) in (hlines or {}).items():
        ax.axhline(y, ls=style, color="gray" if "FP32" in name else "red", label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig_to_img(fig)


def histogram_with_encoding(lo, hi, counts, enc_min, enc_max, title: str) -> str:
    plt = pyplot()
    import numpy as np
    counts = np.asarray(counts, dtype=float)
    edges = np.linspace(lo, hi, len(counts) + 1)
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    ax.stairs(counts, edges, fill=True, alpha=0.6)
    for v in (enc_min, enc_max):
        ax.axvline(v, color="red", lw=1)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)
    return fig_to_img(fig)


def ranges_chart(names, mins, maxs, title: str) -> str:
    plt = pyplot()
    import numpy as np
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names) + 2), 3.5))
    x = np.arange(len(names))
    ax.vlines(x, mins, maxs, lw=4)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_title(title)
    return fig_to_img(fig)


def table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = [c for c in rows[0] if c != "_class"]  # "_class": a CSS class for the row (e.g. "bad")
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(f"<tr class='{r.get('_class', '')}'>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>"
                                                                      for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#eee}}
h2{{border-bottom:1px solid #ddd;margin-top:1.6em}}.grid img{{margin:4px}}.ok{{color:#080}}.bad{{color:#b00}}
tr.bad td{{background:#fbe3e0}}</style>
</head><body><h1>{title}</h1>{body}</body></html>"""


def page(title: str, body: str) -> str:
    return PAGE.format(title=html.escape(title), body=body)

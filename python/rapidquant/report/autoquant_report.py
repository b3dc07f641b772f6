"""The AutoQuant HTML report: one self-contained page."""
from __future__ import annotations

import base64
import html
import os
from collections import Counter

from rapidquant.report.plots import _plt, fig_to_img, page, table

COLORS = {"met": "#2e9d42", "ok": "#3b78c2", "cached": "#3b78c2", "failed": "#c0392b", "skipped": "#b9b9b9",
          "pending": "#dddddd"}


def flow_picture(stages) -> str:
    plt = _plt()
    from matplotlib.patches import FancyBboxPatch
    fig, ax = plt.subplots(figsize=(1.55 * len(stages) + 0.5, 1.9))
    ax.set_xlim(0, 1.55 * len(stages))
    ax.set_ylim(0, 1.6)
    ax.axis("off")
    for i, st in enumerate(stages):
        x = 0.1 + 1.55 * i
        ran = st.status in ("ok", "met", "cached", "failed")
        box = FancyBboxPatch((x, 0.45), 1.2, 0.7, boxstyle="round,pad=0.05", fc=COLORS.get(st.status, "#ddd"),
                             ec="black" if ran else "#999", lw=2.5 if st.status == "met" else 1)
        ax.add_patch(box)
        ax.text(x + 0.6, 0.92, st.name.replace("_", "\n"), ha="center", va="center", fontsize=7.5,
                color="white" if ran else "black", weight="bold")
        score = "" if st.score is None else f"{st.score:.4f}"
        ax.text(x + 0.6, 0.62, f"{st.status} {score}", ha="center", va="center", fontsize=6.5,
                color="white" if ran else "black")
        if i + 1 < len(stages):
            nxt = stages[i + 1].status in ("ok", "met", "cached", "failed")
            ax.annotate("", xy=(x + 1.52, 0.8), xytext=(x + 1.27, 0.8),
                        arrowprops=dict(arrowstyle="->", lw=2 if (ran and nxt) else 0.8,
                                        color="black" if (ran and nxt) else "#aaa"))
    ax.text(0.1, 0.15, "path taken in bold; green = met the target, blue = ran, red = failed, grey = skipped",
            fontsize=7)
    return fig_to_img(fig)


def encodings_summary(sim) -> str:
    qs = sim.quantizers()
    params = set(sim.param_quantizers())
    kinds = Counter()
    rows = []
    for n, q in qs.items():
        kind = "weight" if n in params else "activation"
        prec = "float" if not q.enabled else (q.float_format if q.dtype == "float" else f"int{q.bitwidth}")
        gran = "per-tensor" if q.axis is None else ("per-block" if q.block_size else "per-channel")
        kinds[(kind, prec, gran if kind == "weight" else "")] += 1
        if q.enabled and q.scale is not None and len(rows) < 200:
            s = q.scale.detach().reshape(-1)
            rows.append({"quantizer": n, "precision": prec, "granularity": gran, "scheme": q.scheme,
                         "scale (min..max)": f"{float(s.min()):.3g}..{float(s.max()):.3g}"})
    summary = [{"kind": k[0], "precision": k[1], "granularity": k[2], "quantizers": v} for k, v in sorted(kinds.items())]
    return table(summary) + "<details><summary>all encodings</summary>" + table(rows) + "</details>"


def _img_file(path) -> str:
    with open(path, "rb") as f:
        return f'<img src="data:image/png;base64,{base64.b64encode(f.read()).decode()}"/>'


def write_report(res, aq, path: str) -> str:
    c = aq.config
    verdict = (f"<p class='ok'><b>Target met</b>: {res.score:.4f} &ge; {res.target:.4f}</p>" if res.met else
               f"<p class='bad'><b>Target not met</b>: best {res.score if res.score is not None else 'n/a'} "
               f"vs target {res.target if res.target is not None else 'n/a'}</p>")
    body = [verdict, f"<p>{html.escape(res.message)}</p>",
            table([{"FP32 score": f"{res.fp32_score:.4f}" if res.fp32_score is not None else "n/a",
                    "target": f"{res.target:.4f}" if res.target is not None else "n/a",
                    "best score": f"{res.score:.4f}" if res.score is not None else "n/a",
                    "best stage": res.best_stage, "total time (s)": f"{res.seconds:.1f}",
                    "eval_fn calls": aq.evaluations,
                    "config": f"W{c.param_bw}A{c.act_bw}, allowed drop {c.allowed_drop}"}]),
            "<h2>Flow</h2>", flow_picture(res.stages),
            "<h2>Stages</h2>",
            table([{"stage": s.name, "status": s.status, "score": "" if s.score is None else f"{s.score:.4f}",
                    "time (s)": f"{s.seconds:.2f}", "details": s.message} for s in res.stages])]
    sel = next((s for s in res.stages if s.name == "scheme_selection" and s.artifacts.get("schemes")), None)
    if sel is not None:
        body += ["<h2>Quantization schemes</h2>",
                 table([{"param/act scheme": "/".join(r["scheme"]), "proxy SQNR (dB)": f"{r['proxy_sqnr_db']:.2f}",
                         "score": f"{r['score']:.4f}" if "score" in r else "(proxy only)"}
                        for r in sel.artifacts["schemes"]])]
    amp_rec = next((s for s in res.stages if s.name == "amp" and s.artifacts.get("pareto_plot")), None)
    if amp_rec is not None and os.path.exists(amp_rec.artifacts["pareto_plot"]):
        body += ["<h2>AMP Pareto front</h2>", _img_file(amp_rec.artifacts["pareto_plot"])]
    sens = os.path.join(c.results_dir, "sensitivity.html")
    if os.path.exists(sens):
        body.append("<h2>Sensitivity</h2><p>See <a href='sensitivity.html'>sensitivity.html</a>.</p>")
    if res.sim is not None:
        body += ["<h2>Chosen encodings</h2>", encodings_summary(res.sim)]
    if res.export_check:
        ok = res.export_check.get("ort_ok")
        body += ["<h2>Export check</h2>",
                 f"<p class='{'ok' if ok else 'bad'}'>ONNX model {'runs' if ok else 'does not run'} in onnxruntime; "
                 f"max |sim - onnxruntime| on the dummy input = {res.export_check.get('ort_max_abs_diff')}; "
                 f"{res.export_check.get('qdq_pairs')} QuantizeLinear/DequantizeLinear pairs.</p>",
                 f"<p>{html.escape(str(res.onnx_path))}<br>{html.escape(str(res.encodings_path))}</p>"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(page("rapidquant AutoQuant report", "".join(body)))
    os.replace(path + ".tmp", path)
    return path

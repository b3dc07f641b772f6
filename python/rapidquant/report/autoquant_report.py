"""The AutoQuant HTML report: one self-contained page."""
from __future__ import annotations

import base64
import html
import os
from collections import Counter

from rapidquant.export.onnx_qdq import PARITY_WARN_STEPS, Parity
from rapidquant.report.plots import fig_to_img, page, pyplot, table

COLORS = {"met": "#2e9d42", "ok": "#3b78c2", "cached": "#3b78c2", "failed": "#c0392b", "skipped": "#b9b9b9",
          "pending": "#dddddd"}


FLOW_PER_ROW = 6  # boxes per row of the flow picture once the stages do not fit one page width
PITCH, ROW_PITCH = 1.55, 1.3


def flow_picture(stages) -> str:
    """The stages as boxes joined by arrows, in rows of FLOW_PER_ROW when there are more than
    eight (one row of twelve is wider than the page); a row's last box leads to the next
    row's first."""
    plt = pyplot()
    from matplotlib.patches import FancyBboxPatch
    per_row = len(stages) if len(stages) <= 8 else FLOW_PER_ROW
    rows = -(-len(stages) // per_row)
    height = 1.6 + (rows - 1) * ROW_PITCH
    fig, ax = plt.subplots(figsize=(PITCH * per_row + 0.5, 1.9 * height / 1.6))
    ax.set_xlim(0, PITCH * per_row)
    ax.set_ylim(0, height)
    ax.axis("off")

    def corner(i):  # (left, bottom) of box i
        return 0.1 + PITCH * (i % per_row), 0.45 + (rows - 1 - i // per_row) * ROW_PITCH

    def ran(st):
        return st.status in ("ok", "met", "cached", "failed")

    for i, st in enumerate(stages):
        x, y = corner(i)
        box = FancyBboxPatch((x, y), 1.2, 0.7, boxstyle="round,pad=0.05", fc=COLORS.get(st.status, "#ddd"),
                             ec="black" if ran(st) else "#999", lw=2.5 if st.status == "met" else 1)
        ax.add_patch(box)
        ax.text(x + 0.6, y + 0.47, st.name.replace("_", "\n"), ha="center", va="center", fontsize=7.5,
                color="white" if ran(st) else "black", weight="bold")
        score = "" if st.score is None else f"{st.score:.4f}"
        ax.text(x + 0.6, y + 0.17, f"{st.status} {score}", ha="center", va="center", fontsize=6.5,
                color="white" if ran(st) else "black")
        if i + 1 == len(stages):
            continue
        bold = ran(st) and ran(stages[i + 1])
        style = dict(arrowstyle="->", lw=2 if bold else 0.8, color="black" if bold else "#aaa")
        nx, ny = corner(i + 1)
        if ny == y:  # the next box is to the right
            ax.annotate("", xy=(nx - 0.03, y + 0.35), xytext=(x + 1.27, y + 0.35), arrowprops=style)
        else:  # down from this box, back to the next row's first box
            mid = y - ROW_PITCH / 2 + 0.35
            ax.plot([x + 0.6, x + 0.6, nx + 0.6], [y - 0.07, mid, mid], color=style["color"], lw=style["lw"])
            ax.annotate("", xy=(nx + 0.6, ny + 0.77), xytext=(nx + 0.6, mid), arrowprops=style)
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


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _config_rows(c) -> list[dict]:
    if c is None:
        return []
    sim = c.sim
    gran = "per-block %s" % sim.block_size if sim.block_size else {True: "per-channel", False: "per-tensor",
                                                                    None: "hw config"}[sim.per_channel]
    excl = ", ".join(e if isinstance(e, str) else getattr(e, "__name__", str(e)) for e in sim.exclude) or "none"
    return [{"weights": f"{sim.param_bw or 'hw'}-bit {sim.dtype} ({gran})", "activations": f"{sim.act_bw or 'hw'}-bit",
             "hw config": sim.hw_config if isinstance(sim.hw_config, str) else "(dict)", "excluded": excl,
             "allowed drop": c.allowed_drop, "AMP candidates": ", ".join(c.amp_candidates or ()) or "none",
             "AdaRound": "on" if c.use_adaround else "off", "verify on the ONNX file": c.verify_artifact,
             "seed": c.seed}]


def _disagrees(s, target) -> bool:
    """The sim met the target and the exported file did not."""
    return (target is not None and s.score is not None and s.artifact_score is not None
            and s.score >= target > s.artifact_score)


def _stage_rows(res) -> list[dict]:
    rows = []
    for s in res.stages:
        row = {"stage": s.name, "status": s.status, "sim score": _f(s.score) if s.score is not None else "",
               "ONNX score (onnxruntime)": _f(s.artifact_score) if s.artifact_score is not None else "",
               "eval_fn calls": s.evaluations, "calibrations": s.calibrations, "time (s)": f"{s.seconds:.2f}",
               "peak memory (MiB)": "" if s.peak_rss_mb is None else f"{s.peak_rss_mb:.0f}", "details": s.message}
        if s.status == "failed" or _disagrees(s, res.target):
            row["_class"] = "bad"
        rows.append(row)
    return rows


# stage artifact keys that list what a technique left untreated: key -> how to read an entry
_UNTREATED = {"not_folded": "BN left unfolded", "skipped": "left untreated", "float_leaves": "kept in float",
              "float_weights": "weight kept in float", "widened": "activation grid given more bits",
              "bias_fits": "weight grid widened for its int32 bias", "saturated_biases": "int32 bias clipped",
              "cancelling": "bias cancels the output"}


def _untreated_rows(res) -> list[dict]:
    rows = []
    for s in res.stages:
        for key, what in _UNTREATED.items():
            items = s.artifacts.get(key) or []
            items = items.items() if isinstance(items, dict) else items
            for it in items:
                name, why = (it[0], it[1]) if isinstance(it, (list, tuple)) and len(it) >= 2 else (it, "")
                rows.append({"stage": s.name, "what": what, "layer": name, "why": why})
    return rows


def _score_chart(res) -> str:
    """Sim and exported-file score per stage, zoomed to the scores (differences of a few
    tenths of a percent are the point), with the FP32 score and the target."""
    ran = [s for s in res.stages if s.score is not None or s.artifact_score is not None]
    if not ran:
        return ""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ran) + 2), 3.4))
    x = list(range(len(ran)))
    for key, label, marker in (("score", "sim", "o"), ("artifact_score", "exported ONNX in onnxruntime", "s")):
        pts = [(i, getattr(s, key)) for i, s in zip(x, ran) if getattr(s, key) is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, ms=8 if marker == "o" else 6,
                    mfc="none" if marker == "o" else None, label=label)
    if res.fp32_score is not None:
        ax.axhline(res.fp32_score, ls="--", color="gray", label="FP32")
    if res.target is not None:
        ax.axhline(res.target, ls=":", color="red", label="target")
    ax.set_xticks(x)
    ax.set_xticklabels([s.name for s in ran], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("eval_fn")
    ax.set_title("score per stage")
    ax.legend(fontsize=7, loc="best")
    return fig_to_img(fig)


# stages whose artifacts list learned units (their short schedules too): key, the error
# after learning, what a unit is
_LEARNED = {"adaround": ("layers", "mse_adaround", "layer"),
            "block_reconstruction": ("blocks", "mse_reconstructed", "block")}


def _rounding_sections(res) -> list[str]:
    """Per layer (AdaRound) or block (block reconstruction): the output error with nearest
    rounding and after learning, as a chart (log scale: errors span decades) and a table."""
    out = []
    for s in res.stages:
        key, after, unit = _LEARNED.get(s.name.removesuffix("_short"), (None, None, None))
        units = s.artifacts.get(key) if key else None
        if not units:
            continue
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(units) + 1.2))
        y = list(range(len(units)))[::-1]
        ax.barh([v + 0.2 for v in y], [max(u["mse_nearest"], 1e-12) for u in units], height=0.4,
                color="#b9b9b9", label="nearest rounding")
        ax.barh([v - 0.2 for v in y], [max(u[after], 1e-12) for u in units], height=0.4, color="#3b78c2",
                label="learned")
        ax.set_yticks(y)
        ax.set_yticklabels([u["name"] for u in units], fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(f"{unit} output error (MSE, calibration batch)")
        ax.legend(fontsize=7, loc="lower right")
        rows = [{unit: u["name"], "iterations": u["iterations"], "error, nearest": f"{u['mse_nearest']:.4g}",
                 "error, learned": f"{u[after]:.4g}", "weights flipped": f"{100 * u['flipped']:.1f} %",
                 "time (s)": f"{u['seconds']:.2f}"} for u in units]
        out += [f"<h2>{html.escape(s.name)}: error per {unit}</h2>", fig_to_img(fig), table(rows)]
    return out


def _export_section(res) -> list[str]:
    ec = res.export_check
    if not ec:
        return []
    ok = ec.get("ort_ok")
    out = ["<h2>The exported file</h2>",
           f"<p class='{'ok' if ok else 'bad'}'>The ONNX model {'runs' if ok else 'does not run'} in onnxruntime "
           f"with default session options; {ec.get('qdq_pairs')} QuantizeLinear/DequantizeLinear pairs. "
           f"Artifact check: {html.escape(res.artifact_check)}.</p>",
           f"<p>{html.escape(str(res.onnx_path))}<br>{html.escape(str(res.encodings_path))}</p>"]
    parity = ec.get("parity") or {}
    if parity:
        def db(v):
            return "" if v is None else f"{v:.1f}"
        out += ["<p>Sim vs onnxruntime on the dummy input, per session optimization level (a step is one "
                "quantization step of the model's output), and each one's output SQNR against the float model: "
                "a few steps apart with equal SQNR is rounding ties resolved the other way; a lower file "
                "SQNR is a file worse than the sim.</p>",
                table([{"optimization": level, "max |diff|": f"{p['max_abs_diff']:.3g}",
                        "max steps": "float output" if p.get("max_steps") is None else f"{p['max_steps']:.0f}",
                        "elements differing": f"{100 * p['frac_differing']:.2f} %", "elements": p["elements"],
                        "file SQNR (dB)": db(p.get("file_sqnr_db")), "sim SQNR (dB)": db(p.get("sim_sqnr_db")),
                        **({"_class": "bad"} if (p.get("max_steps") or 0) > PARITY_WARN_STEPS
                           and not Parity(**p).same_quality() else {})}
                       for level, p in parity.items()])]
    out += _latency_lines(res.latency)
    if ec.get("unmapped"):
        out.append(f"<p class='bad'>Quantizers with no node in the ONNX graph: "
                   f"{html.escape(', '.join(ec['unmapped']))}</p>")
    for level, err in (ec.get("ort_errors") or {}).items():
        out.append(f"<p class='bad'>onnxruntime ({html.escape(level)}): {html.escape(str(err))}</p>")
    return out


def _latency_lines(lat: dict) -> list[str]:
    if not lat:
        return []
    if lat.get("error"):
        return [f"<p class='bad'>Latency not measured: {html.escape(lat['error'])}</p>"]
    faster = lat["speedup"] >= 1.0
    verdict = (f"{lat['speedup']:.2f}x faster than" if faster else f"{1 / lat['speedup']:.2f}x slower than")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 1.4))
    ax.barh([1, 0], [lat["float_ms"], lat["quantized_ms"]], color=["#b9b9b9", "#3b78c2"])
    ax.set_yticks([1, 0])
    ax.set_yticklabels(["float ONNX", "quantized ONNX"], fontsize=8)
    ax.set_xlabel("median latency (ms)")
    return [f"<p class='{'ok' if faster else 'bad'}'>On this machine the quantized file runs {verdict} the float "
            f"model exported the same way: {lat['quantized_ms']:.3f} ms vs {lat['float_ms']:.3f} ms per run on the "
            f"dummy input (onnxruntime CPU, default options, {lat['threads']} thread(s), median of "
            f"{lat['runs']} runs in interleaved rounds). A target with integer kernels (an NPU) will differ; "
            f"this is what onnxruntime on this CPU does with the QDQ graph.</p>", fig_to_img(fig)]


def _verification_section(res) -> list[str]:
    v = res.verification
    if not v:
        return []
    rows = [{"data": v["split"], "scored": v.get("on", ""), "FP32": _f(v["fp32"]), "result": _f(v["score"]),
             "drop": _f(v["drop"]), "allowed drop": res.config.allowed_drop if res.config else "",
             "interval": "" if v["interval"] is None else
             f"{100 * v['confidence']:.0f}%: {v['interval'][0]:.4f}..{v['interval'][1]:.4f} ({v['samples']} samples)",
             **({} if v.get("prediction") is None else {
                 f"drop on {v['predict_samples']} new samples": f"{v['prediction'][0]:.4f}..{v['prediction'][1]:.4f}"}),
             "confirmed": "yes" if v["met"] else "NO", **({} if v["met"] else {"_class": "bad"})}]
    out = ["<h2>Verification</h2>", "<p>The accepted result scored once more" +
           (" on held-out data the search never saw." if v["split"] == "held-out" else
            " on the search data (no held-out function was given: the interval covers sampling noise, not the "
            "optimism of choosing the best of many candidates on these samples).") +
           ("" if v.get("prediction") is None else
            f" The interval is for the expected drop; a test on {v['predict_samples']} new samples has its own "
            "sampling noise, so the drop it shows lies in the wider prediction interval, which decides "
            "'confirmed'.") + "</p>", table(rows)]
    if v["why"]:
        out.append(f"<p class='bad'>{html.escape(v['why'])}</p>")
    if v["interval"] is not None and res.config is not None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 1.9))
        lo, hi = v["interval"]
        color = "#2e9d42" if v["met"] else "#c0392b"
        if v.get("prediction") is not None:  # decides 'met': drawn first, wider and paler
            plo, phi = v["prediction"]
            ax.errorbar([v["drop"]], [0], xerr=[[v["drop"] - plo], [phi - v["drop"]]], fmt="none", capsize=9,
                        elinewidth=6, alpha=0.35, color=color,
                        label=f"where the drop on {v['predict_samples']} new samples will lie")
        ax.errorbar([v["drop"]], [0], xerr=[[v["drop"] - lo], [hi - v["drop"]]], fmt="o", capsize=6,
                    color=color, label="drop and its interval (expected drop)")
        ax.axvline(res.config.allowed_drop, ls=":", color="red", label="allowed drop")
        ax.set_ylim(-1, 2.2 if v.get("prediction") is not None else 1.6)  # the legend above the bars
        ax.set_yticks([])
        ax.set_xlabel("FP32 score - result score")
        ax.legend(fontsize=7, loc="upper left")
        out.append(fig_to_img(fig))
    return out


def write_report(res, path: str) -> str:
    """The report of an AutoQuantResult (everything it shows is in the result)."""
    c = res.config
    where = "the exported ONNX model in onnxruntime" if res.artifact_check == "onnxruntime" else \
        f"the sim ({res.artifact_check})"
    verdict = (f"<p class='ok'><b>Target met</b>: {_f(res.score)} &ge; {_f(res.target)}, scored on "
               f"{html.escape(where)}</p>" if res.met else
               f"<p class='bad'><b>Target not met</b>: best {_f(res.score)} vs target {_f(res.target)} "
               f"(scored on {html.escape(where)})</p>")
    body = [verdict, f"<p>{html.escape(res.message)}</p>",
            table([{"FP32 score": _f(res.fp32_score), "target": _f(res.target), "result score": _f(res.score),
                    "sim score": _f(res.sim_score), "ONNX score": _f(res.artifact_score), "best stage": res.best_stage,
                    "total time (s)": f"{res.seconds:.1f}", "eval_fn calls": res.evaluations,
                    "calibration passes": res.calibrations}]),
            "<h2>Configuration</h2>", table(_config_rows(c)),
            "<h2>Flow</h2>", flow_picture(res.stages), _score_chart(res),
            "<h2>Stages</h2>", "<p>Rows in red: a stage failed, or its sim met the target and its exported file "
            "did not.</p>", table(_stage_rows(res))]
    untreated = _untreated_rows(res)
    body += ["<h2>Left untreated, or changed</h2>",
             "<p>Layers a technique did not treat, grids calibration changed from the configured ones, layers "
             "calibration found at risk, and why.</p>" if untreated else "", table(untreated)]
    sel = next((s for s in res.stages if s.name == "scheme_selection" and s.artifacts.get("schemes")), None)
    if sel is not None:
        body += ["<h2>Quantization schemes</h2>",
                 table([{"param/act scheme": "/".join(r["scheme"]), "proxy SQNR (dB)": f"{r['proxy_sqnr_db']:.2f}",
                         "score": f"{r['score']:.4f}" if "score" in r else "(proxy only)"}
                        for r in sel.artifacts["schemes"]])]
    amp_rec = next((s for s in res.stages if s.name == "amp" and s.artifacts.get("pareto_plot")), None)
    if amp_rec is not None and os.path.exists(amp_rec.artifacts["pareto_plot"]):
        body += ["<h2>AMP Pareto front</h2>", _img_file(amp_rec.artifacts["pareto_plot"])]
    body += _rounding_sections(res)
    body += _verification_section(res)
    body += _export_section(res)
    if res.sim is not None:
        body += ["<h2>Chosen encodings</h2>", encodings_summary(res.sim)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(page("rapidquant AutoQuant report", "".join(body)))
    os.replace(path + ".tmp", path)
    return path

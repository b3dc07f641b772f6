"""Sensitivity analysis (QuantAnalyzer) and LiteMP."""
from __future__ import annotations

import contextlib

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from rapidquant.calibration import Observer
from rapidquant.int32_bias import fit_int32_biases
from rapidquant.scoring import as_score, sqnr_db
from rapidquant.mixed_precision.groups import apply_candidate, find_groups, parse_candidate, snapshot
from rapidquant.progress import progress
from rapidquant.qmodules import FunctionalOp, QuantizedModule


@dataclass
class SensitivityResult:
    fp32: float
    quantized: float
    weights_only: float
    activations_only: float
    per_layer: list = field(default_factory=list)   # {layer, only_quantized, only_float, sqnr_db, mse}
    ranges: list = field(default_factory=list)       # {quantizer, kind, min, max, channels}
    seconds: float = 0.0
    json_path: str | None = None
    html_path: str | None = None

    def ranking(self) -> list[str]:
        """Layers from most to least sensitive (lowest score with only that layer quantized)."""
        return [r["layer"] for r in sorted(self.per_layer, key=lambda r: (r["only_quantized"], r["sqnr_db"]))]


def _layer_outputs(sim, batches, quantized: bool) -> dict:
    """Output of every quantized module on the batches, by module name."""
    from rapidquant.batches import call_model
    outs, hooks = {}, []
    for name, m in sim.model.named_modules():
        if isinstance(m, (QuantizedModule, FunctionalOp)):
            def hook(mod, inp, out, name=name):
                o = out[0] if isinstance(out, tuple) else out
                if isinstance(o, torch.Tensor) and o.is_floating_point():
                    outs.setdefault(name, []).append(o.detach().float().cpu())
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), (contextlib.nullcontext() if quantized else sim.disabled()):
            for b in batches:
                call_model(sim.model, b, sim.n_inputs)
    finally:
        for h in hooks:
            h.remove()
    return outs


def _activation_histograms(sim, batches, bins=256) -> dict:
    """Histograms of each enabled activation quantizer's input (encodings untouched)."""
    from rapidquant.batches import call_model
    obs, hooks = {}, []
    for name, q in sim.activation_quantizers().items():
        if not q.enabled:
            continue
        o = obs[name] = Observer(name, histogram=True, bins=bins, nonfinite="ignore")
        hooks.append(q.register_forward_pre_hook(lambda mod, args, o=o: o.update(args[0])))
    try:
        with torch.no_grad():
            for b in batches:
                call_model(sim.model, b, sim.n_inputs)
    finally:
        for h in hooks:
            h.remove()
    return {n: o.stats for n, o in obs.items() if o.stats is not None}


def analyze(sim, eval_fn, data, *, num_batches: int = 4, results_dir: str | None = None,
            per_layer: bool = True, show_progress: bool = True) -> SensitivityResult:
    """Where does quantization hurt? (AIMET's QuantAnalyzer, on a calibrated sim.)

    Scores FP32, weight-only and activation-only quantization; for each layer (a MAC
    layer with its input activations, or a standalone activation) the score with only
    that layer quantized and with only that layer left in float; per-layer output SQNR
    and MSE against FP32; weight/activation ranges; histograms with the encodings
    overlaid. Writes sensitivity.json and sensitivity.html (matplotlib plots) to
    results_dir. The sim is restored afterwards. eval_fn(model) -> float, higher is better.
    """
    t0 = time.perf_counter()
    if not any(q.is_initialized for q in sim.quantizers().values()):
        sim.compute_encodings(data, show_progress=show_progress)
    batches = []
    for b in data:
        if len(batches) >= num_batches:
            break
        batches.append(b)
    if not batches:
        raise ValueError("analyze needs at least one batch of data")
    acts = set(sim.activation_quantizers())  # every flag change below is undone by sim.disabled()
    with sim.disabled():
        fp32 = as_score(eval_fn(sim.model), "the FP32 model")
    q_all = as_score(eval_fn(sim.model), "the quantized model")
    with sim.disabled(lambda q: q.name in acts):
        w_only = as_score(eval_fn(sim.model), "weight-only quantization")
    with sim.disabled(lambda q: q.name not in acts):
        a_only = as_score(eval_fn(sim.model), "activation-only quantization")
    res = SensitivityResult(fp32, q_all, w_only, a_only)
    groups = find_groups(sim, sim.dummy_input)
    fp_out = _layer_outputs(sim, batches, quantized=False)
    q_out = _layer_outputs(sim, batches, quantized=True)
    if per_layer:
        for g in progress(groups, total=len(groups), desc="per-layer sensitivity", enabled=show_progress):
            names = set(g.act_quantizers + g.param_quantizers)
            with sim.disabled(lambda q: q.name not in names):
                only_q = as_score(eval_fn(sim.model), f"only {g.name} quantized")
            with sim.disabled(lambda q: q.name in names):
                only_f = as_score(eval_fn(sim.model), f"only {g.name} in float")
            mod = g.layers[0] if g.layers else g.act_quantizers[0].rsplit(".", 1)[0]
            s, mse = float("nan"), float("nan")
            if mod in fp_out and mod in q_out:
                f, q = torch.cat([t.reshape(-1) for t in fp_out[mod]]), torch.cat([t.reshape(-1) for t in q_out[mod]])
                s, mse = sqnr_db(q, f), float((q - f).pow(2).mean())
            res.per_layer.append({"layer": g.name, "only_quantized": only_q, "only_float": only_f,
                                  "sqnr_db": s, "mse": mse})
    for name, q in sim.quantizers().items():
        if not q.enabled or q.scale is None:
            continue
        lo, hi = q.get_range()
        res.ranges.append({"quantizer": name, "kind": "activation" if name in acts else "weight",
                           "min": lo.reshape(-1).tolist(), "max": hi.reshape(-1).tolist(),
                           "channels": int(lo.numel())})
    hists = _activation_histograms(sim, batches)
    res.seconds = time.perf_counter() - t0
    if results_dir:
        os.makedirs(results_dir, exist_ok=True)
        res.json_path = os.path.join(results_dir, "sensitivity.json")
        with open(res.json_path, "w") as f:
            json.dump({k: v for k, v in asdict(res).items() if k not in ("json_path", "html_path")}, f, indent=1)
        res.html_path = os.path.join(results_dir, "sensitivity.html")
        with open(res.html_path, "w") as f:
            f.write(sensitivity_html(res, sim, hists))
    return res


def sensitivity_sections(res: SensitivityResult, sim=None, hists=None) -> str:
    """HTML body parts (also embedded in the AutoQuant report)."""
    from rapidquant.report.plots import bar_chart, histogram_with_encoding, ranges_chart, table
    parts = ["<h2>Scores</h2>", table([{"FP32": f"{res.fp32:.4f}", "W+A quantized": f"{res.quantized:.4f}",
                                        "weights only": f"{res.weights_only:.4f}",
                                        "activations only": f"{res.activations_only:.4f}"}])]
    if res.per_layer:
        labels = [r["layer"][:40] for r in res.per_layer]
        parts.append("<h2>Per-layer sensitivity</h2>")
        parts.append(bar_chart(labels, {"only this layer quantized": [r["only_quantized"] for r in res.per_layer],
                                        "only this layer in float": [r["only_float"] for r in res.per_layer]},
                               "score per layer", "score", {"FP32": (res.fp32, "--")}))
        parts.append(bar_chart(labels, {"output SQNR (dB)": [0 if math.isnan(r["sqnr_db"]) else r["sqnr_db"]
                                                             for r in res.per_layer]},
                               "per-layer output SQNR vs FP32 (full quantized model)", "dB"))
        parts.append(table([{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}
                            for r in sorted(res.per_layer, key=lambda r: r["only_quantized"])]))
    if res.ranges:
        for kind in ("weight", "activation"):
            rs = [r for r in res.ranges if r["kind"] == kind]
            if rs:
                parts.append(f"<h2>{kind.capitalize()} encoding ranges</h2>")
                parts.append(ranges_chart([r["quantizer"][:40] for r in rs], [min(r["min"]) for r in rs],
                                          [max(r["max"]) for r in rs], f"{kind} ranges (over channels)"))
    if hists and sim is not None:
        parts.append("<h2>Activation histograms with the encoding range (red)</h2><div class='grid'>")
        qs = sim.quantizers()
        for n, st in list(hists.items())[:24]:
            q = qs[n]
            if q.scale is None or st.hist is None:
                continue
            lo, hi = q.get_range()
            parts.append(histogram_with_encoding(float(st.lo[0]), float(st.hi[0]), st.hist[0].tolist(),
                                                 float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0]), n))
        parts.append("</div>")
    return "".join(parts)


def sensitivity_html(res: SensitivityResult, sim=None, hists=None) -> str:
    from rapidquant.report.plots import page
    return page("rapidquant sensitivity analysis", sensitivity_sections(res, sim, hists))


def lite_mp(sim, sensitivity, percent: float, precision="W16A16") -> list[str]:
    """Promote the top ``percent`` % most sensitive layers to a higher precision.

    sensitivity: a SensitivityResult, or {layer group name: score} where a lower score
    means more sensitive. precision: a candidate ("W16A16", "W8A16", "FP16",
    ((16, "int"), (16, "int"))) or "int16" / "fp16". Encodings come from the sim's kept
    statistics (no new calibration pass). Returns the promoted group names.
    """
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100] (got {percent})")
    prec = {"int16": "W16A16", "fp16": "FP16", "int8": "W8A8"}.get(precision, precision)
    cand = parse_candidate(prec)
    if isinstance(sensitivity, SensitivityResult):
        scores = {r["layer"]: r["only_quantized"] for r in sensitivity.per_layer}
    else:
        scores = dict(sensitivity)
    groups = {g.name: g for g in find_groups(sim, sim.dummy_input)}
    unknown = [n for n in scores if n not in groups]
    if unknown:
        raise KeyError(f"sensitivity names not found in this sim: {unknown[:5]}")
    ranked = sorted(scores, key=lambda n: scores[n])
    k = max(1, math.ceil(len(ranked) * percent / 100))
    snap = snapshot(sim)
    for n in ranked[:k]:
        apply_candidate(sim, groups[n], cand, snap)
    fit_int32_biases(sim)
    return ranked[:k]

"""Proof of the final answer: the accepted file scored once more, on held-out data when the
user gives a verification function, with a bootstrap confidence interval of the drop when
the evaluation returns per-sample scores.

Every search decision (scheme, stage, AMP point) uses eval_fn on the same samples, so the
best score found is biased upwards, more so the more candidates were tried. A verification
function on samples the search never saw removes that bias. The confidence interval says
where the expected drop lies; the prediction interval (``predict_samples``) says where the
drop a user measures on that many new samples will lie: wider, because that measurement has
its own sampling noise.
"""
from __future__ import annotations

import numpy as np


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_drop(fp32: np.ndarray, quant: np.ndarray, confidence: float, seed: int,
                   new_samples: int | None = None) -> tuple[float, float]:
    """Percentile interval of mean(fp32) - mean(quant) over paired resamples of the samples.

    With ``new_samples``: the interval of the drop that many new samples of the same
    population will show. Each resample then adds a second, independent resample's deviation
    from the observed mean, of that size: the new measurement's own noise."""
    if fp32.shape != quant.shape:
        raise ValueError(f"per-sample results differ in length between the FP32 model ({fp32.size}) and the "
                         f"quantized model ({quant.size}): they must score the same samples in the same order")
    rng = np.random.default_rng(seed)
    d = fp32.astype(np.float64) - quant
    drops = np.empty(BOOTSTRAP_RESAMPLES)
    # one block of indices for the expected drop (as ever: the same draws for a seed); blocks of
    # at most 32 MB when a large new sample is drawn beside
    step = BOOTSTRAP_RESAMPLES if new_samples is None else max(1, (1 << 22) // max(d.size, new_samples))
    for s in range(0, BOOTSTRAP_RESAMPLES, step):
        r = min(step, BOOTSTRAP_RESAMPLES - s)
        drops[s:s + r] = d[rng.integers(0, d.size, size=(r, d.size))].mean(1)
        if new_samples is not None:
            drops[s:s + r] += d[rng.integers(0, d.size, size=(r, new_samples))].mean(1) - d.mean()
    tail = (1.0 - confidence) / 2
    return float(np.quantile(drops, tail)), float(np.quantile(drops, 1 - tail))


def verify(samples, fp32_model, quant_model, allowed_drop: float, confidence: float | None, seed: int,
           held_out: bool, predict_samples: int | None = None) -> dict:
    """Score both models with ``samples(model, what) -> (score, per-sample or None)``.
    'met' needs the drop within the allowed drop and, when a confidence level is asked
    for, the upper end of its interval too (which needs per-sample scores): of the
    prediction interval for ``predict_samples`` new samples when that is given."""
    fp32, f_s = samples(fp32_model, "the FP32 model (verification)")
    score, q_s = samples(quant_model, "the result (verification)")
    out = {"split": "held-out" if held_out else "search", "fp32": fp32, "score": score, "drop": fp32 - score,
           "confidence": confidence, "interval": None, "samples": None, "prediction": None,
           "predict_samples": predict_samples, "why": ""}
    if confidence is not None:
        if f_s is not None and q_s is not None:
            out["interval"] = bootstrap_drop(f_s, q_s, confidence, seed)
            out["samples"] = int(f_s.size)
            if predict_samples is not None:
                out["prediction"] = bootstrap_drop(f_s, q_s, confidence, seed, new_samples=predict_samples)
        else:
            out["why"] = ("a confidence level needs per-sample scores (eval returned one number), "
                          "so the target cannot be confirmed")
    deciding = out["prediction"] or out["interval"]
    out["met"] = out["drop"] <= allowed_drop and (
        confidence is None or (deciding is not None and deciding[1] <= allowed_drop))
    return out


def interval_text(v: dict) -> str:
    """', 95% interval a..b' and the prediction for new samples when there is one ('' without)."""
    if v.get("interval") is None:
        return ""
    c = f"{100 * v['confidence']:.0f}%"
    text = f", {c} interval {v['interval'][0]:.4f}..{v['interval'][1]:.4f}"
    if v.get("prediction") is not None:
        text += (f" (expected drop); on {v['predict_samples']} new samples the drop will lie in "
                 f"{v['prediction'][0]:.4f}..{v['prediction'][1]:.4f} ({c})")
    return text


def deciding_upper(v: dict) -> float | None:
    """The upper end 'met' was decided on: the prediction's when there is one, else the interval's."""
    pick = v.get("prediction") or v.get("interval")
    return None if pick is None else pick[1]

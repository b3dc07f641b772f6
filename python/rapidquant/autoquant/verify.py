"""Proof of the final answer: the accepted file scored once more, on held-out data when the
user gives a verification function, with a bootstrap confidence interval of the drop when
the evaluation returns per-sample scores.

Every search decision (scheme, stage, AMP point) uses eval_fn on the same samples, so the
best score found is biased upwards, more so the more candidates were tried. A verification
function on samples the search never saw removes that bias; the interval says how much the
drop could move with another sample of the same size.
"""
from __future__ import annotations

import numpy as np


BOOTSTRAP_RESAMPLES = 2000


def bootstrap_drop(fp32: np.ndarray, quant: np.ndarray, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile interval of mean(fp32) - mean(quant) over paired resamples of the samples."""
    if fp32.shape != quant.shape:
        raise ValueError(f"per-sample results differ in length between the FP32 model ({fp32.size}) and the "
                         f"quantized model ({quant.size}): they must score the same samples in the same order")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, fp32.size, size=(BOOTSTRAP_RESAMPLES, fp32.size))
    drops = fp32[idx].mean(1) - quant[idx].mean(1)
    tail = (1.0 - confidence) / 2
    return float(np.quantile(drops, tail)), float(np.quantile(drops, 1 - tail))


def verify(samples, fp32_model, quant_model, allowed_drop: float, confidence: float | None, seed: int,
           held_out: bool) -> dict:
    """Score both models with ``samples(model, what) -> (score, per-sample or None)``.
    'met' needs the drop within the allowed drop and, when a confidence level is asked
    for, the upper end of its interval too (which needs per-sample scores)."""
    fp32, f_s = samples(fp32_model, "the FP32 model (verification)")
    score, q_s = samples(quant_model, "the result (verification)")
    out = {"split": "held-out" if held_out else "search", "fp32": fp32, "score": score, "drop": fp32 - score,
           "confidence": confidence, "interval": None, "samples": None, "why": ""}
    if confidence is not None:
        if f_s is not None and q_s is not None:
            out["interval"] = bootstrap_drop(f_s, q_s, confidence, seed)
            out["samples"] = int(f_s.size)
        else:
            out["why"] = ("a confidence level needs per-sample scores (eval returned one number), "
                          "so the target cannot be confirmed")
    out["met"] = out["drop"] <= allowed_drop and (
        confidence is None or (out["interval"] is not None and out["interval"][1] <= allowed_drop))
    return out

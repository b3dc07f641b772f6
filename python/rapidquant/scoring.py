"""Scores: the user's evaluation results and the cheap proxy (output SQNR) that ranks
candidates before the user's evaluation decides. AutoQuant, AMP and sensitivity analysis
all score through this module."""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from rapidquant.batches import call_model


def per_sample(value, what: str):
    """eval_fn's result as a 1-d float64 array of per-sample scores, or None when it is one
    number. Per-sample results (a 1-d tensor, array or list of numbers) let AutoQuant put a
    confidence interval on the drop; their mean is the score."""
    v = value
    if isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() > 1:
        v = v.detach().cpu().double().numpy()
    elif isinstance(v, (list, tuple)) and len(v) > 1 and all(isinstance(e, numbers.Real) for e in v):
        v = np.asarray(v, dtype=np.float64)
    if isinstance(v, np.ndarray) and v.ndim == 1 and v.size > 1:
        if v.dtype != bool and not np.issubdtype(v.dtype, np.number):
            raise ValueError(f"eval_fn returned an array of {v.dtype} for {what}; it must return one finite real "
                             "number, or a 1-d tensor of per-sample scores")
        v = v.astype(np.float64)
        if not np.isfinite(v).all():
            raise ValueError(f"eval_fn returned per-sample results with NaN/Inf for {what}; it must return one "
                             "finite real number, or a 1-d tensor of finite per-sample scores")
        return v
    return None


def as_score(value, what: str) -> float:
    """A finite real number from an eval_fn result (float, int, numpy scalar, 0-d tensor,
    or per-sample results: their mean)."""
    samples = per_sample(value, what)
    if samples is not None:
        return float(samples.mean())
    v = value
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    elif hasattr(v, "item") and getattr(v, "size", None) == 1:  # numpy scalar / 0-d array
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"eval_fn returned {value!r} for {what}; it must return one finite real number "
                         "(higher is better), or a 1-d tensor of per-sample scores")
    return float(v)


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of out against ref, in dB (200 when identical)."""
    num = ref.double().pow(2).sum()
    den = (out.double() - ref.double()).pow(2).sum()
    if den == 0:
        return 200.0
    return float(10 * torch.log10(num / den))


def first_tensor(out):
    """The tensor a proxy compares: the output itself, its first element, or the first
    tensor field of a dict/dataclass output (e.g. last_hidden_state)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    if isinstance(out, dict):
        return first_tensor(next(iter(out.values())))
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return first_tensor(out.to_tuple()[0])
    raise TypeError(f"cannot find a tensor in a model output of type {type(out).__name__}")


def model_outputs(model, batches, n_inputs: int | None = None) -> list[torch.Tensor]:
    """The model's (first) output tensor on each batch, without gradients."""
    outs = []
    with torch.no_grad():
        for b in batches:
            outs.append(first_tensor(call_model(model, b, n_inputs)))
    return outs


def output_sqnr(model, batches, ref_outs, n_inputs: int | None = None) -> float:
    """Mean output SQNR (dB) of model against reference outputs on the same batches."""
    outs = model_outputs(model, batches, n_inputs)
    return sum(sqnr_db(o, r) for o, r in zip(outs, ref_outs)) / len(outs)

"""Layers whose bias cancels most of their output, found during calibration.

A BN-folded conv can compute a small difference of large numbers: the weighted sum and the
bias nearly cancel (u2netp: pre-bias rms 335, bias rms 334). The weight grid's rounding error
scales with the weighted sum, not with what is left, so against the layer's output it is as
many times larger as the sum is larger than the output. Such a layer can carry most of a
model's quantization error at a bitwidth that suits every other layer (u2netp: 14.1 dB
output SQNR, 25.0 dB with 16-bit weights on that one layer), and nothing else names it.

``watch(sim)`` hooks the Conv/Linear wrappers for the first batch each one sees while the
sim calibrates, and measures on it: the rms of the pre-bias output, of the output, and the
output SQNR that the weight rounding alone leaves (quantized against float weights, same
input). A layer is named when the bias cancels at least ``MIN_CANCELLATION`` of the output's
scale and its weight-rounding SQNR is under ``MAX_SQNR_DB``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from rapidquant.qmodules import QuantizedModule, conv_with_weight

MIN_CANCELLATION = 10.0  # pre-bias rms / output rms
MAX_SQNR_DB = 20.0       # output SQNR of the weight rounding alone
ROWS = 32                # rows of the first batch measured (a batch of 16 ImageNet crops: all)


_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}  # spatial dims


def _pre_bias(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    if isinstance(m, tuple(_CONVS)):  # a zero bias: other padding modes run the module itself
        return conv_with_weight(m, x, w, torch.zeros_like(m.bias))
    if isinstance(m, nn.Linear):
        return F.linear(x, w)
    return None


def _channel_axis(m: nn.Module, x: torch.Tensor) -> int | None:
    """The output's channel dim (Linear: the last; a conv: 1, or 0 for an unbatched input)."""
    if isinstance(m, nn.Linear):
        return -1
    n = next((k for cls, k in _CONVS.items() if isinstance(m, cls)), None)
    return None if n is None else x.dim() - n - 1


def measure(wrapper: QuantizedModule, x: torch.Tensor) -> dict | None:
    """The cancellation figures of one Conv/Linear wrapper on input x (None: no bias, no
    integer weight grid, or not a plain Conv/Linear)."""
    m = wrapper.module
    q = wrapper.param_quantizers["weight"] if "weight" in wrapper.param_quantizers else None
    if getattr(m, "bias", None) is None or q is None or not q.enabled or q.dtype != "int" or q.scale is None:
        return None
    ch = _channel_axis(m, x)
    if ch is None:
        return None
    if ch != 0 and x.dim() > 1:
        x = x[:ROWS]  # enough rows for rms figures; calibration stays as fast
    with torch.no_grad():
        w = m.weight.detach()
        pre = _pre_bias(m, x, w)
        err = _pre_bias(m, x, q(w)) - pre
        shape = [1] * pre.dim()
        shape[ch] = -1
        out = pre + m.bias.detach().reshape(shape)
        rms_pre, rms_out = float(pre.double().pow(2).mean().sqrt()), float(out.double().pow(2).mean().sqrt())
        e = float(err.double().pow(2).mean())
    sqnr = math.inf if e == 0 else 10 * math.log10(max(rms_out ** 2, 1e-300) / e)
    return {"pre_bias_rms": rms_pre, "output_rms": rms_out, "weight_sqnr_db": sqnr,
            "cancellation": rms_pre / rms_out if rms_out > 0 else math.inf}


@contextmanager
def watch(sim, found: dict):
    """While active, each Conv/Linear wrapper of ``sim`` measures its first input; the layers
    that cancel (see the module doc) go into ``found`` (layer name -> figures)."""
    seen, handles = set(), []

    def hook(name):
        def fn(mod, args, out):
            if name in seen or not args or not isinstance(args[0], torch.Tensor):
                return
            seen.add(name)
            try:
                r = measure(mod, args[0])
            except Exception:  # noqa: BLE001 - a diagnostic: an input it cannot read is not measured
                return
            if r is not None and r["cancellation"] >= MIN_CANCELLATION and r["weight_sqnr_db"] < MAX_SQNR_DB:
                found[name] = r
        return fn

    for name, m in sim.model.named_modules():
        if isinstance(m, QuantizedModule) and isinstance(m.module, (*_CONVS, nn.Linear)):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def describe(r: dict) -> str:
    """What the figures of ``measure`` mean, in a sentence."""
    return (f"the bias cancels most of the output (pre-bias rms {r['pre_bias_rms']:.3g}, output rms "
            f"{r['output_rms']:.3g}: {r['cancellation']:.0f}x), so the weight rounding leaves "
            f"{r['weight_sqnr_db']:.1f} dB on the layer's output")

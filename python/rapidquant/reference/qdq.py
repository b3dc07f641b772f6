"""Reference affine and float quantize-dequantize (ONNX QuantizeLinear/DequantizeLinear)."""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_FORMATS = {
    torch.float16: 65504.0,
    torch.bfloat16: float(torch.finfo(torch.bfloat16).max),
    torch.float8_e4m3fn: 448.0,
    torch.float8_e5m2: 57344.0,
}


def expand_param(p: torch.Tensor, shape: Sequence[int], spec: Sequence[int]) -> torch.Tensor:
    """Broadcast a full-rank parameter tensor to x's shape following the block list."""
    for d, b in enumerate(spec):
        if b > 1:
            p = p.repeat_interleave(b, dim=d)
    return p.expand(tuple(shape))


class RoundSTE(torch.autograd.Function):
    """round half to even forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, v):
        return torch.round(v)

    @staticmethod
    def backward(ctx, g):
        return g


def round_ste(v: torch.Tensor) -> torch.Tensor:
    return RoundSTE.apply(v)


def quantize_dequantize(x, scale, zero_point, qmin, qmax, spec):
    """(clamp(round(x / s) + zp, qmin, qmax) - zp) * s in fp32; LSQ gradients via autograd."""
    s = expand_param(scale.float(), x.shape, spec)
    z = expand_param(zero_point.float(), x.shape, spec)
    u = round_ste(x.float() / s) + z
    return ((torch.clamp(u, qmin, qmax) - z) * s).to(x.dtype)


def keeps_float(numel: int, seed: int, threshold: int) -> torch.Tensor:
    """QDrop's choice per flat index (rapidquant/drop.h): splitmix64's finalizer of
    seed + i * golden ratio, upper 32 bits below threshold. numpy's uint64 wraps like C++."""
    import numpy as np
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + np.arange(numel, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return torch.from_numpy((z >> np.uint64(32)) < np.uint64(threshold))


def quantize_dequantize_drop(x, scale, zero_point, qmin, qmax, spec, seed, threshold):
    """QDrop: x where keeps_float, else quantize_dequantize (autograd gives the kernel's gradients)."""
    keep = keeps_float(x.numel(), seed, threshold).reshape(x.shape).to(x.device)
    return torch.where(keep, x, quantize_dequantize(x, scale, zero_point, qmin, qmax, spec))


def drop_select(a, b, seed, threshold):
    """b where keeps_float, else a."""
    return torch.where(keeps_float(a.numel(), seed, threshold).reshape(a.shape).to(a.device), b, a)


def quantize(x, scale, zero_point, qmin, qmax, spec, dtype=torch.int32):
    s = expand_param(scale.float(), x.shape, spec)
    z = expand_param(zero_point.float(), x.shape, spec)
    return torch.clamp(torch.round(x.float() / s) + z, qmin, qmax).to(dtype)


def dequantize(q, scale, zero_point, spec, dtype=torch.float32):
    s = expand_param(scale.float(), q.shape, spec)
    z = expand_param(zero_point.float(), q.shape, spec)
    return ((q.float() - z) * s).to(dtype)


def float_quantize_dequantize(x, fmt: torch.dtype, scale=None, spec=None):
    """Saturating round-to-nearest-even cast to fmt (optionally scaled), back in x.dtype."""
    m = FLOAT_FORMATS[fmt]
    v = x.float()
    if scale is not None:
        s = expand_param(scale.float(), x.shape, spec)
        v = v / s
    v = torch.clamp(v, -m, m).to(fmt).float()
    if scale is not None:
        v = v * s
    return v.to(x.dtype)

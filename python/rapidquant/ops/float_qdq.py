"""Float-format quantize-dequantize: fp16, bf16, fp8 e4m3fn / e5m2 (RNE, saturating)."""
from __future__ import annotations

import torch

from rapidquant._ext import _C
from rapidquant.ops import _utils as U
from rapidquant.ops._lib import cfn, define, register
from rapidquant.reference.qdq import FLOAT_FORMATS

FORMAT_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3}
FORMAT_MAX = {FORMAT_CODE[k]: v for k, v in FLOAT_FORMATS.items()}

FQDQ = define("float_quantize_dequantize(Tensor x, Tensor? scale, int fmt, int[] block) -> Tensor")


def _impl(device):
    def impl(x, scale, fmt, block):
        xc = x.contiguous()
        y = torch.empty_like(xc)
        s = None if scale is None else scale.contiguous()
        args = (xc.data_ptr(), y.data_ptr(), U.dtype_code(xc), list(xc.shape), list(block),
                U.ptr(s), fmt)
        if device == "cpu":
            _C.float_qdq_cpu(*args, U.nthreads())
        else:
            cfn("float_qdq_cuda")(*args, U.stream(xc))
        return y
    return impl


register(FQDQ, _impl("cpu"), _impl("cuda"))


@torch.library.register_fake(FQDQ)
def _(x, scale, fmt, block):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    x, scale, fmt, block = inputs
    ctx.save_for_backward(x, scale)
    ctx.fmt, ctx.block = fmt, block


def _backward(ctx, grad):
    # Straight-through inside the representable range, zero where the cast saturates.
    x, scale = ctx.saved_tensors
    v = x.float()
    if scale is not None:
        from rapidquant.reference.qdq import expand_param
        v = v / expand_param(scale, x.shape, ctx.block)
    return grad * (v.abs() <= FORMAT_MAX[ctx.fmt]).to(grad.dtype), None, None, None


torch.library.register_autograd(FQDQ, _backward, setup_context=_setup)


def float_quantize_dequantize(x: torch.Tensor, dtype: torch.dtype, scale=None, axis=None) -> torch.Tensor:
    """Round x / scale to ``dtype``'s grid (nearest even, saturating at its max) and scale back.

    dtype is one of torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2.
    scale is optional: None, a scalar, or one value per channel along ``axis``. The result
    has x's dtype. Differentiable in x (straight-through, zero where it saturates).
    """
    if dtype not in FORMAT_CODE:
        raise ValueError(f"dtype must be one of {[str(k) for k in FORMAT_CODE]} (got {dtype})")
    U.dtype_code(x)
    spec = U.block_spec(x.shape, axis, None)
    s = None if scale is None else U.as_param(scale, x, spec, "scale")
    if s is None and axis is not None:
        raise ValueError("axis is only meaningful with a per-channel scale")
    return torch.ops.rapidquant.float_quantize_dequantize(x, s, FORMAT_CODE[dtype], spec)

"""Affine quantize-dequantize, quantize-only, dequantize-only, with LSQ-style autograd."""
from __future__ import annotations

import torch

from rapidquant._ext import _C
from rapidquant.ops import _utils as U
from rapidquant.ops._lib import cfn, define, register

QDQ = define(
    "quantize_dequantize(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int[] block) -> Tensor"
)
QDQ_BWD = define(
    "quantize_dequantize_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int qmin, "
    "int qmax, int[] block, bool need_scale, bool need_zero_point) -> (Tensor, Tensor, Tensor)"
)
QUANTIZE = define(
    "quantize(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int[] block, ScalarType dtype) -> Tensor"
)
DEQUANTIZE = define(
    "dequantize(Tensor q, Tensor scale, Tensor zero_point, int[] block, ScalarType dtype) -> Tensor"
)


# ---------------------------------------------------------------- kernels
def _qdq_impl(device):
    def impl(x, scale, zero_point, qmin, qmax, block):
        xc = x.contiguous()
        y = torch.empty_like(xc)
        s, z = scale.contiguous(), zero_point.contiguous()
        args = (xc.data_ptr(), y.data_ptr(), U.dtype_code(xc), list(xc.shape), list(block),
                s.data_ptr(), z.data_ptr(), qmin, qmax)
        if device == "cpu":  # the CPU kernel checks the encoding itself
            _C.qdq_cpu(*args, U.nthreads())
        else:
            U.check_encoding(s, z, qmin, qmax)
            cfn("qdq_cuda")(*args, U.stream(xc))
        return y
    return impl


def _qdq_bwd_impl(device):
    def impl(grad, x, scale, zero_point, qmin, qmax, block, need_scale, need_zero_point):
        xc, g = x.contiguous(), grad.contiguous().to(x.dtype)
        s, z = scale.contiguous(), zero_point.contiguous()
        dx = torch.empty_like(xc)
        mk = torch.empty if device == "cpu" else torch.zeros  # CUDA accumulates atomically
        ds = mk(s.shape, dtype=torch.float32, device=x.device) if need_scale else s.new_empty(0)
        dz = mk(z.shape, dtype=torch.float32, device=x.device) if need_zero_point else z.new_empty(0)
        args = (xc.data_ptr(), g.data_ptr(), dx.data_ptr(), U.dtype_code(xc), list(xc.shape),
                list(block), s.data_ptr(), z.data_ptr(), qmin, qmax,
                ds.data_ptr() if need_scale else 0, dz.data_ptr() if need_zero_point else 0)
        if device == "cpu":
            _C.qdq_backward_cpu(*args, U.nthreads())
        else:
            U.check_encoding(s, z, qmin, qmax)
            cfn("qdq_backward_cuda")(*args, U.stream(xc))
        return dx, ds, dz
    return impl


def _quantize_impl(device):
    def impl(x, scale, zero_point, qmin, qmax, block, dtype):
        xc = x.contiguous()
        q = torch.empty(xc.shape, dtype=dtype, device=x.device)
        s, z = scale.contiguous(), zero_point.contiguous()
        args = (xc.data_ptr(), U.dtype_code(xc), q.data_ptr(), U.ITYPE_CODE[dtype], list(xc.shape),
                list(block), s.data_ptr(), z.data_ptr(), qmin, qmax)
        if device == "cpu":
            _C.quantize_cpu(*args, U.nthreads())
        else:
            U.check_encoding(s, z, qmin, qmax)
            cfn("quantize_cuda")(*args, U.stream(xc))
        return q
    return impl


def _dequantize_impl(device):
    def impl(q, scale, zero_point, block, dtype):
        qc = q.contiguous()
        y = torch.empty(qc.shape, dtype=dtype, device=q.device)
        s, z = scale.contiguous(), zero_point.contiguous()
        args = (qc.data_ptr(), U.ITYPE_CODE[qc.dtype], y.data_ptr(), U.DTYPE_CODE[dtype],
                list(qc.shape), list(block), s.data_ptr(), z.data_ptr())
        if device == "cpu":
            _C.dequantize_cpu(*args, U.nthreads())
        else:
            U.check_encoding(s)
            cfn("dequantize_cuda")(*args, U.stream(qc))
        return y
    return impl


_QDQ_CPU = _qdq_impl("cpu")

for _name, _make in ((QDQ, _qdq_impl), (QDQ_BWD, _qdq_bwd_impl), (QUANTIZE, _quantize_impl),
                     (DEQUANTIZE, _dequantize_impl)):
    register(_name, _make("cpu"), _make("cuda"))


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake(QDQ)
def _(x, scale, zero_point, qmin, qmax, block):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake(QDQ_BWD)
def _(grad, x, scale, zero_point, qmin, qmax, block, need_scale, need_zero_point):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    ds = scale.new_empty(scale.shape if need_scale else (0,))
    dz = zero_point.new_empty(zero_point.shape if need_zero_point else (0,))
    return dx, ds, dz


@torch.library.register_fake(QUANTIZE)
def _(x, scale, zero_point, qmin, qmax, block, dtype):
    return torch.empty(x.shape, dtype=dtype, device=x.device)


@torch.library.register_fake(DEQUANTIZE)
def _(q, scale, zero_point, block, dtype):
    return torch.empty(q.shape, dtype=dtype, device=q.device)


# ---------------------------------------------------------------- autograd
def _setup(ctx, inputs, output):
    x, scale, zero_point, qmin, qmax, block = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.qrange = (qmin, qmax)
    ctx.block = block


def _backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    need_x, need_s, need_z = ctx.needs_input_grad[:3]
    dx, ds, dz = torch.ops.rapidquant.quantize_dequantize_backward(
        grad, x, scale, zero_point, *ctx.qrange, ctx.block, need_s, need_z)
    return (dx if need_x else None, ds if need_s else None, dz if need_z else None,
            None, None, None)


torch.library.register_autograd(QDQ, _backward, setup_context=_setup)


# ---------------------------------------------------------------- public API
def prepare_encoding(x, scale, zero_point, qmin, qmax, axis, block_size):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (got {type(x).__name__})")
    U.dtype_code(x)
    U.check_qrange(qmin, qmax)
    spec = U.block_spec(x.shape, axis, block_size)
    s = U.as_param(scale, x, spec, "scale")
    z = U.as_param(zero_point, x, spec, "zero_point")
    return spec, s, z


def _eager_cpu(*tensors) -> bool:
    """True when the dispatcher adds nothing: plain CPU tensors, no autograd, no tracing."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if type(t) is not torch.Tensor or t.device.type != "cpu" or (grad and t.requires_grad):
            return False
    return True


def quantize_dequantize(x, scale, zero_point, qmin: int, qmax: int, axis=None, block_size=None):
    """Fake-quantize x: (clamp(round_half_even(x / scale) + zero_point, qmin, qmax) - zero_point) * scale.

    Per tensor (scalar scale), per channel (``axis``), or per block (``block_size``; see
    :func:`rapidquant.ops._utils.block_spec`). Math in fp32, output in x's dtype. NaN in x
    gives NaN out; +-inf saturates to the range ends. Differentiable in x (straight-through
    inside the range), scale and zero_point (LSQ-style).
    """
    spec, s, z = prepare_encoding(x, scale, zero_point, qmin, qmax, axis, block_size)
    if _eager_cpu(x, s, z):  # same kernel, minus ~8 us of dispatcher per call
        return _QDQ_CPU(x, s, z, int(qmin), int(qmax), spec)
    return torch.ops.rapidquant.quantize_dequantize(x, s, z, int(qmin), int(qmax), spec)


def quantize_dequantize_(x, scale, zero_point, qmin: int, qmax: int, axis=None, block_size=None):
    """In-place quantize_dequantize for inference (no autograd): overwrites and returns x.

    Saves the output allocation on large activations. Falls back to the out-of-place op
    where in-place is not possible (non-contiguous x, autograd, tracing, devices without
    a native kernel).
    """
    spec, s, z = prepare_encoding(x, scale, zero_point, qmin, qmax, axis, block_size)
    if not x.is_contiguous() or torch.compiler.is_compiling() or type(x) is not torch.Tensor \
            or (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad or z.requires_grad)) \
            or x.device.type not in ("cpu", "cuda"):
        return torch.ops.rapidquant.quantize_dequantize(x, s, z, int(qmin), int(qmax), spec)
    sc, zc = s.contiguous(), z.contiguous()
    args = (x.data_ptr(), x.data_ptr(), U.dtype_code(x), list(x.shape), spec, sc.data_ptr(), zc.data_ptr(),
            int(qmin), int(qmax))
    if x.device.type == "cpu":
        _C.qdq_cpu(*args, U.nthreads())
    else:
        from rapidquant._ext import require_cuda
        require_cuda("quantize_dequantize_")
        U.check_encoding(sc, zc, int(qmin), int(qmax))
        cfn("qdq_cuda")(*args, U.stream(x))
    return x


def _int_dtype(qmin: int, qmax: int) -> torch.dtype:
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    if qmin >= -32768 and qmax <= 32767:
        return torch.int16
    return torch.int32


def quantize(x, scale, zero_point, qmin: int, qmax: int, axis=None, block_size=None, dtype=None):
    """Integer q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax).

    The output dtype is the smallest of int8/uint8/int16/int32 that holds [qmin, qmax]
    unless given. NaN cannot be represented in an integer tensor, so NaN in x raises.
    """
    spec, s, z = prepare_encoding(x, scale, zero_point, qmin, qmax, axis, block_size)
    dtype = dtype or _int_dtype(qmin, qmax)
    if dtype not in U.ITYPE_CODE:
        raise TypeError(f"quantize writes int8, uint8, int16 or int32 (got {dtype})")
    info = torch.iinfo(dtype)
    if qmin < info.min or qmax > info.max:
        raise ValueError(f"[qmin, qmax] = [{qmin}, {qmax}] does not fit in {dtype}")
    if x.numel() and torch.isnan(x).any():  # every device (the CUDA kernel would write garbage)
        raise ValueError("x contains NaN, which has no integer representation; clean the input "
                         "(torch.nan_to_num) before quantizing")
    return torch.ops.rapidquant.quantize(x, s, z, int(qmin), int(qmax), spec, dtype)


def dequantize(q, scale, zero_point, axis=None, block_size=None, dtype=torch.float32):
    """x_hat = (q - zero_point) * scale for an integer tensor q (int8/uint8/int16/int32)."""
    if not isinstance(q, torch.Tensor) or q.dtype not in U.ITYPE_CODE:
        got = q.dtype if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"q must be an int8, uint8, int16 or int32 tensor (got {got})")
    if dtype not in U.DTYPE_CODE:
        raise TypeError(f"dtype must be float32, float16 or bfloat16 (got {dtype})")
    spec = U.block_spec(q.shape, axis, block_size)
    s = U.as_param(scale, q, spec, "scale")
    z = U.as_param(zero_point, q, spec, "zero_point")
    return torch.ops.rapidquant.dequantize(q, s, z, spec, dtype)

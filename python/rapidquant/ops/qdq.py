"""Affine quantize-dequantize, quantize-only, dequantize-only, with LSQ-style autograd."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

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
QDQ_DROP = define(
    "quantize_dequantize_drop(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int[] block, "
    "int seed, int threshold) -> Tensor"
)
QDQ_DROP_BWD = define(
    "quantize_dequantize_drop_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int qmin, "
    "int qmax, int[] block, int seed, int threshold, bool need_scale, bool need_zero_point) -> (Tensor, Tensor, Tensor)"
)
DROP_SELECT = define("drop_select(Tensor a, Tensor b, int seed, int threshold) -> Tensor")
QUANTIZE = define(
    "quantize(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int[] block, ScalarType dtype) -> Tensor"
)
DEQUANTIZE = define(
    "dequantize(Tensor q, Tensor scale, Tensor zero_point, int[] block, ScalarType dtype) -> Tensor"
)


# ---------------------------------------------------------------- kernels
def _run_qdq(kernel, device, x, scale, zero_point, qmin, qmax, block, drop=()):
    """Forward of quantize_dequantize (drop: () or (seed, threshold) for the QDrop kernel)."""
    xc = x.contiguous()
    y = torch.empty_like(xc)
    s, z = scale.contiguous(), zero_point.contiguous()
    args = (xc.data_ptr(), y.data_ptr(), U.dtype_code(xc), list(xc.shape), list(block),
            s.data_ptr(), z.data_ptr(), qmin, qmax, *drop)
    if device == "cpu":  # the CPU kernel checks the encoding itself
        getattr(_C, f"{kernel}_cpu")(*args, U.nthreads())
    else:
        U.check_encoding(s, z, qmin, qmax)
        cfn(f"{kernel}_cuda")(*args, U.stream(xc))
    return y


def _run_qdq_backward(kernel, device, grad, x, scale, zero_point, qmin, qmax, block, drop, need_scale,
                      need_zero_point):
    """Backward of quantize_dequantize: (dx, dscale, dzero_point); unneeded ones are empty."""
    xc, g = x.contiguous(), grad.contiguous().to(x.dtype)
    s, z = scale.contiguous(), zero_point.contiguous()
    dx = torch.empty_like(xc)
    mk = torch.empty if device == "cpu" else torch.zeros  # CUDA accumulates atomically
    ds = mk(s.shape, dtype=torch.float32, device=x.device) if need_scale else s.new_empty(0)
    dz = mk(z.shape, dtype=torch.float32, device=x.device) if need_zero_point else z.new_empty(0)
    args = (xc.data_ptr(), g.data_ptr(), dx.data_ptr(), U.dtype_code(xc), list(xc.shape),
            list(block), s.data_ptr(), z.data_ptr(), qmin, qmax, *drop,
            ds.data_ptr() if need_scale else 0, dz.data_ptr() if need_zero_point else 0)
    if device == "cpu":
        getattr(_C, f"{kernel}_cpu")(*args, U.nthreads())
    else:
        U.check_encoding(s, z, qmin, qmax)
        cfn(f"{kernel}_cuda")(*args, U.stream(xc))
    return dx, ds, dz


def _qdq_impl(device):
    def impl(x, scale, zero_point, qmin, qmax, block):
        return _run_qdq("qdq", device, x, scale, zero_point, qmin, qmax, block)
    return impl


def _qdq_bwd_impl(device):
    def impl(grad, x, scale, zero_point, qmin, qmax, block, need_scale, need_zero_point):
        return _run_qdq_backward("qdq_backward", device, grad, x, scale, zero_point, qmin, qmax, block, (),
                                 need_scale, need_zero_point)
    return impl


def _qdq_drop_impl(device):
    def impl(x, scale, zero_point, qmin, qmax, block, seed, threshold):
        return _run_qdq("qdq_drop", device, x, scale, zero_point, qmin, qmax, block, (seed, threshold))
    return impl


def _qdq_drop_bwd_impl(device):
    def impl(grad, x, scale, zero_point, qmin, qmax, block, seed, threshold, need_scale, need_zero_point):
        return _run_qdq_backward("qdq_drop_backward", device, grad, x, scale, zero_point, qmin, qmax, block,
                                 (seed, threshold), need_scale, need_zero_point)
    return impl


def _drop_select_impl(device):
    def impl(a, b, seed, threshold):
        ac, bc = a.contiguous(), b.contiguous()
        out = torch.empty_like(ac)
        args = (ac.data_ptr(), bc.data_ptr(), out.data_ptr(), U.dtype_code(ac), list(ac.shape), seed, threshold)
        if device == "cpu":
            _C.drop_select_cpu(*args, U.nthreads())
        else:
            cfn("drop_select_cuda")(*args, U.stream(ac))
        return out
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

for _name, _make in ((QDQ, _qdq_impl), (QDQ_BWD, _qdq_bwd_impl), (QDQ_DROP, _qdq_drop_impl),
                     (QDQ_DROP_BWD, _qdq_drop_bwd_impl), (DROP_SELECT, _drop_select_impl),
                     (QUANTIZE, _quantize_impl), (DEQUANTIZE, _dequantize_impl)):
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


@torch.library.register_fake(QDQ_DROP)
def _(x, scale, zero_point, qmin, qmax, block, seed, threshold):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake(QDQ_DROP_BWD)
def _(grad, x, scale, zero_point, qmin, qmax, block, seed, threshold, need_scale, need_zero_point):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    ds = scale.new_empty(scale.shape if need_scale else (0,))
    dz = zero_point.new_empty(zero_point.shape if need_zero_point else (0,))
    return dx, ds, dz


@torch.library.register_fake(DROP_SELECT)
def _(a, b, seed, threshold):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


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


def _grads(ctx, grad, bwd):
    """The gradients of quantize_dequantize's inputs (x, scale, zero point), through ``bwd``."""
    x, scale, zero_point = ctx.saved_tensors
    need_x, need_s, need_z = ctx.needs_input_grad[:3]
    dx, ds, dz = bwd(grad, x, scale, zero_point, *ctx.qrange, ctx.block, need_s, need_z)
    return (dx if need_x else None, ds if need_s else None, dz if need_z else None,
            None, None, None)


def _backward(ctx, grad):
    return _grads(ctx, grad, torch.ops.rapidquant.quantize_dequantize_backward)


torch.library.register_autograd(QDQ, _backward, setup_context=_setup)

_QDQ_BWD_CPU = _qdq_bwd_impl("cpu")


class _EagerQDQ(torch.autograd.Function):
    """The same CPU kernels and gradients without the operator dispatcher, for eager calls
    that need gradients (block reconstruction's learned activation steps, LSQ): through
    torch.library a call and its backward cost about 200 us on a small tensor, most of it
    dispatch. Under torch.compile and torch.export the op is called instead."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, block):
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qrange, ctx.block = (qmin, qmax), block
        return _QDQ_CPU(x, scale, zero_point, qmin, qmax, block)

    @staticmethod
    @once_differentiable  # as the op: its backward has no gradient of its own
    def backward(ctx, grad):
        return _grads(ctx, grad, _QDQ_BWD_CPU)


def _drop_setup(ctx, inputs, output):
    x, scale, zero_point, qmin, qmax, block, seed, threshold = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = (qmin, qmax, block, seed, threshold)


def _drop_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    need_x, need_s, need_z = ctx.needs_input_grad[:3]
    dx, ds, dz = torch.ops.rapidquant.quantize_dequantize_drop_backward(
        grad, x, scale, zero_point, *ctx.args, need_s, need_z)
    return (dx if need_x else None, ds if need_s else None, dz if need_z else None) + (None,) * 5


torch.library.register_autograd(QDQ_DROP, _drop_backward, setup_context=_drop_setup)


# ---------------------------------------------------------------- public API
def prepare_encoding(x, scale, zero_point, qmin, qmax, axis, block_size, flat: bool = False):
    """(block spec, scale, zero point) checked against x; ``flat``: see ``as_param``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor (got {type(x).__name__})")
    U.dtype_code(x)
    U.check_qrange(qmin, qmax)
    spec = U.block_spec(x.shape, axis, block_size)
    s = U.as_param(scale, x, spec, "scale", flat=flat)
    z = U.as_param(zero_point, x, spec, "zero_point", flat=flat)
    return spec, s, z


def quantize_dequantize(x, scale, zero_point, qmin: int, qmax: int, axis=None, block_size=None):
    """Fake-quantize x: (clamp(round_half_even(x / scale) + zero_point, qmin, qmax) - zero_point) * scale.

    Per tensor (scalar scale), per channel (``axis``), or per block (``block_size``; see
    :func:`rapidquant.ops._utils.block_spec`). Math in fp32, output in x's dtype. NaN in x
    gives NaN out; +-inf saturates to the range ends. Differentiable in x (straight-through
    inside the range), scale and zero_point (LSQ-style).
    """
    spec, s, z = prepare_encoding(x, scale, zero_point, qmin, qmax, axis, block_size)
    if U.plain_cpu(x, s, z):  # the same kernels, minus the dispatcher
        if torch.is_grad_enabled() and (x.requires_grad or s.requires_grad or z.requires_grad):
            return _EagerQDQ.apply(x, s, z, int(qmin), int(qmax), spec)
        return _QDQ_CPU(x, s, z, int(qmin), int(qmax), spec)  # ~8 us less per call
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


def drop_threshold(p: float) -> int:
    """The keep-float probability as the kernels' 32-bit threshold."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1] (got {p})")
    return min(int(round(p * 2 ** 32)), 2 ** 32 - 1)


def quantize_dequantize_drop(x, scale, zero_point, qmin: int, qmax: int, p: float, seed: int, axis=None,
                             block_size=None):
    """QDrop's quantize-dequantize: each element keeps its float value with probability p,
    the others are quantize-dequantized as :func:`quantize_dequantize`.

    The choice is a hash of (seed, flat element index) (rapidquant/drop.h): reproducible,
    independent of threads and device, recomputed in the backward instead of stored.
    Gradients: dx = dy for kept elements (straight-through inside the range for the
    others); scale and zero point (LSQ-style) only from the quantized elements.
    Change ``seed`` every step for a fresh choice (0 <= seed < 2**63).
    """
    spec, s, z = prepare_encoding(x, scale, zero_point, qmin, qmax, axis, block_size)
    if not 0 <= int(seed) < 2 ** 63:
        raise ValueError(f"seed must be in [0, 2**63) (got {seed})")
    return torch.ops.rapidquant.quantize_dequantize_drop(x, s, z, int(qmin), int(qmax), spec, int(seed),
                                                         drop_threshold(p))


def drop_select(quantized, float_, p: float, seed: int):
    """QDrop on a block's input: each element is ``float_``'s with probability p, else
    ``quantized``'s, chosen by the same hash as :func:`quantize_dequantize_drop`. Same
    shape and dtype; no gradient (cached inputs)."""
    if not (isinstance(quantized, torch.Tensor) and isinstance(float_, torch.Tensor)):
        raise TypeError("drop_select takes two tensors")
    if quantized.shape != float_.shape or quantized.dtype != float_.dtype or quantized.device != float_.device:
        raise ValueError(f"drop_select needs tensors of one shape, dtype and device (got {tuple(quantized.shape)} "
                         f"{quantized.dtype} {quantized.device} and {tuple(float_.shape)} {float_.dtype} "
                         f"{float_.device})")
    if not 0 <= int(seed) < 2 ** 63:
        raise ValueError(f"seed must be in [0, 2**63) (got {seed})")
    U.dtype_code(quantized)
    return torch.ops.rapidquant.drop_select(quantized, float_, int(seed), drop_threshold(p))


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

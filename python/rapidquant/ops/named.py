"""Export-only twins of the QDQ ops that carry the quantizer's name.

While :func:`carrying_names` is active (ONNX export), a Quantizer calls these instead of
the plain ops. They compute exactly the same thing (they call the plain op), but the
quantizer's name is an argument of the traced node, so the ONNX translation can stamp it
on the QuantizeLinear it emits: each Q node is mapped to its quantizer by construction,
not by matching tensors after torch.onnx has folded and fused the graph.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

from rapidquant.ops import _utils as U
from rapidquant.ops._lib import define, register
from rapidquant.ops.float_qdq import FORMAT_CODE
from rapidquant.ops.qdq import prepare_encoding

NAMED_QDQ = define("named_quantize_dequantize(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, "
                   "int[] block, str name) -> Tensor")
NAMED_FQDQ = define("named_float_quantize_dequantize(Tensor x, Tensor? scale, int fmt, int[] block, str name) -> Tensor")

_ACTIVE = contextvars.ContextVar("rapidquant_named_qdq", default=False)


@contextlib.contextmanager
def carrying_names():
    """Quantizers call the named ops inside this block (used by the ONNX exporter)."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    return _ACTIVE.get()


# dynamo (tracing a torch.scan body) cannot read a ContextVar: it takes the result as a
# constant. What torch._dynamo.assume_constant_result sets, without importing dynamo here
# (1.5 s of every import of rapidquant; the runs that trace load it themselves)
active._dynamo_marked_constant = True


def _qdq(x, scale, zero_point, qmin, qmax, block, name):
    return torch.ops.rapidquant.quantize_dequantize(x, scale, zero_point, qmin, qmax, block)


def _fqdq(x, scale, fmt, block, name):
    return torch.ops.rapidquant.float_quantize_dequantize(x, scale, fmt, block)


register(NAMED_QDQ, _qdq, _qdq)
register(NAMED_FQDQ, _fqdq, _fqdq)


@torch.library.register_fake(NAMED_QDQ)
def _(x, scale, zero_point, qmin, qmax, block, name):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake(NAMED_FQDQ)
def _(x, scale, fmt, block, name):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def quantize_dequantize(x, scale, zero_point, qmin: int, qmax: int, axis=None, block_size=None, *, name: str):
    """:func:`rapidquant.ops.quantize_dequantize` with the quantizer's name on the traced node.

    A per-tensor or per-channel scale and zero point go in as the quantizer keeps them (0 or 1
    dims): the translation flattens them anyway, and a reshape to x's rank would be two more
    traced nodes per quantizer that torch.onnx decomposes, translates and folds away again
    (300 of MiniLM's 1,050). Per-block grids keep the full-rank layout their Tile needs."""
    spec, s, z = prepare_encoding(x, scale, zero_point, qmin, qmax, axis, block_size, flat=True)
    return torch.ops.rapidquant.named_quantize_dequantize(x, s, z, int(qmin), int(qmax), spec, name)


def float_quantize_dequantize(x, dtype, scale=None, axis=None, *, name: str):
    """:func:`rapidquant.ops.float_quantize_dequantize` with the quantizer's name on the traced node."""
    if dtype not in FORMAT_CODE:
        raise ValueError(f"dtype must be one of {[str(k) for k in FORMAT_CODE]} (got {dtype})")
    spec = U.block_spec(x.shape, axis, None)
    s = None if scale is None else U.as_param(scale, x, spec, "scale")
    return torch.ops.rapidquant.named_float_quantize_dequantize(x, s, FORMAT_CODE[dtype], spec, name)

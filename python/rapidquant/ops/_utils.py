"""Shared argument handling for the torch ops: dtype codes, parameter layouts, checks.

A parameter tensor (scale, zero point, a statistic) relates to x through a per-dimension
"block" list: 0 means the parameter is broadcast along that dimension, b >= 1 means one
parameter per b consecutive indices (1 = per index). Public functions turn the friendly
arguments (axis, block_size) into that list once; the ops and kernels only see the list.
"""
from __future__ import annotations

from typing import Sequence

import torch

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ITYPE_CODE = {torch.int8: 0, torch.uint8: 1, torch.int16: 2, torch.int32: 3}
QRANGE_LIMIT = 1 << 21  # rounding in the kernels is exact for |q| well inside 2^22


def dtype_code(t: torch.Tensor, name: str = "x") -> int:
    try:
        return DTYPE_CODE[t.dtype]
    except KeyError:
        raise TypeError(
            f"{name} has dtype {t.dtype}; rapidquant kernels take float32, float16 or bfloat16 "
            f"(convert with {name}.float())"
        ) from None


def check_qrange(qmin: int, qmax: int) -> None:
    if int(qmin) != qmin or int(qmax) != qmax:
        raise TypeError(f"qmin and qmax must be integers (got {qmin!r}, {qmax!r})")
    if not qmin < qmax:
        raise ValueError(f"qmin ({qmin}) must be smaller than qmax ({qmax})")
    if qmin < -QRANGE_LIMIT or qmax > QRANGE_LIMIT:
        raise ValueError(
            f"[qmin, qmax] = [{qmin}, {qmax}] is outside the supported integer range "
            f"[-{QRANGE_LIMIT}, {QRANGE_LIMIT}] (up to 16-bit grids plus margin)"
        )


def qrange(bitwidth: int, signed: bool) -> tuple[int, int]:
    """Integer grid of a bitwidth: signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    if not 2 <= bitwidth <= 16:
        raise ValueError(f"bitwidth must be in 2..16 (got {bitwidth})")
    return (-(1 << (bitwidth - 1)), (1 << (bitwidth - 1)) - 1) if signed else (0, (1 << bitwidth) - 1)


def _norm_axis(axis: int, ndim: int, what: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}={axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


def block_spec(shape: Sequence[int], axis: int | None, block_size) -> list[int]:
    """Per-dimension block list from the public (axis, block_size) arguments.

    - axis=None, block_size=None: per tensor.
    - axis=a: one parameter per index along a (per channel).
    - block_size=int b: blocks of b along dim 1 (the input channels of Linear/Conv weights)
      and, with axis (default 0), one parameter per index along axis.
    - block_size=tuple with one entry per dim: -1 (or the dim size) = one block over the whole
      dim, k = blocks of k along it (AIMET's convention).
    """
    ndim = len(shape)
    spec = [0] * ndim
    if block_size is None:
        if axis is not None:
            spec[_norm_axis(axis, ndim)] = 1
        return spec
    if isinstance(block_size, int):
        if ndim < 2:
            raise ValueError("an int block_size needs a tensor with at least 2 dims; pass a tuple")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 (got {block_size})")
        a = 0 if axis is None else _norm_axis(axis, ndim)
        if a == 1:
            raise ValueError("axis=1 clashes with an int block_size (blocks run along dim 1); pass a tuple")
        spec[a] = 1
        spec[1] = block_size
    else:
        if axis is not None:
            raise ValueError("pass either axis with an int block_size, or a per-dim block_size tuple without axis")
        if len(block_size) != ndim:
            raise ValueError(f"block_size {tuple(block_size)} needs one entry per dimension of x {tuple(shape)}")
        for d, b in enumerate(block_size):
            spec[d] = 0 if (b == -1 or b == shape[d]) else int(b)
            if spec[d] < 0:
                raise ValueError(f"block_size entries must be -1 or >= 1 (got {b} in dim {d})")
    for d, b in enumerate(spec):
        if b > 1 and shape[d] % b:
            raise ValueError(f"block size {b} does not divide dim {d} of size {shape[d]}")
    return spec


def param_shape(shape: Sequence[int], spec: Sequence[int]) -> list[int]:
    return [1 if b == 0 else s // b for s, b in zip(shape, spec)]


def as_param(t, x: torch.Tensor, spec, name: str, float_param: bool = True, flat: bool = False) -> torch.Tensor:
    """Reshape a scale/zero-point to the full-rank parameter shape, as float32. ``flat``: a
    per-tensor or per-channel value of at most one dim is checked but kept as it is (under
    export a reshape is a traced node torch.onnx then handles one by one)."""
    pshape = param_shape(x.shape, spec)
    if (type(t) is torch.Tensor and t.dtype == torch.float32 and t.device == x.device
            and list(t.shape) == pshape):
        return t  # fast path: already in the kernel layout
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(t, dtype=torch.float32, device=x.device)
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move {name} to {x.device}")
    if t.is_floating_point() and t.dtype != torch.float32:
        t = t.float()
    elif not t.is_floating_point():
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must be a float or integer tensor (got {t.dtype})")
        t = t.float()
    n = 1
    for s in pshape:
        n *= s
    if t.numel() != n:
        what = "per tensor" if n == 1 else f"shape {tuple(pshape)} (or {n} values)"
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but x of shape {tuple(x.shape)} with this "
            f"axis/block_size needs {what}"
        )
    if flat and t.dim() <= 1 and max(spec, default=0) <= 1:
        return t
    return t.reshape(pshape)


# nn.Parameter is a plain tensor to torch's dispatch (it disables __torch_function__): the
# learned rounding variables of AdaRound and block reconstruction are Parameters
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_cpu(*tensors) -> bool:
    """Plain CPU tensors outside torch.compile/torch.export: the eager kernels may be called
    without the operator dispatcher (the autograd.Function paths of ops.qdq and ops.adaround)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    return all(type(t) in _PLAIN and t.device.type == "cpu" for t in tensors)


def check_same_device(*named: tuple[str, torch.Tensor]) -> None:
    dev = named[0][1].device
    for name, t in named[1:]:
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device} but {named[0][0]} is on {dev}; put them on one device")


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def nthreads() -> int:
    return torch.get_num_threads()


def stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def check_encoding(scale: torch.Tensor, zero_point: torch.Tensor | None = None,
                   qmin: int | None = None, qmax: int | None = None) -> None:
    """The CPU kernels' encoding checks, in torch, for devices whose kernels do not check
    (CUDA): every scale finite and > 0; every zero point an integer in [qmin, qmax]. One
    reduction and one device sync; the message is built only on failure."""
    s = scale.reshape(-1)
    bad_s = ~(torch.isfinite(s) & (s > 0))
    bad_z = None
    if zero_point is not None:
        z = zero_point.reshape(-1)
        bad_z = ~((z == torch.round(z)) & (z >= qmin) & (z <= qmax))  # NaN fails every comparison
    if not bool(bad_s.any() | (bad_z.any() if bad_z is not None else False)):
        return
    if bad_s.any():
        i = int(bad_s.nonzero()[0, 0])
        raise ValueError(f"scale[{i}] = {float(s[i]):g} must be finite and > 0; a zero-range tensor needs a "
                         "minimum scale (calibrate it or widen the range)")
    i = int(bad_z.nonzero()[0, 0])
    raise ValueError(f"zero_point[{i}] = {float(zero_point.reshape(-1)[i]):g} must be an integer in "
                     f"[qmin, qmax] = [{qmin}, {qmax}]")

"""Encoding statistics: min/max, histograms, and the fused MSE/SQNR range search."""
from __future__ import annotations

import torch

from rapidquant._ext import _C
from rapidquant.ops import _utils as U
from rapidquant.ops._lib import cfn, define, register

MINMAX = define("minmax(Tensor x, int[] block) -> (Tensor, Tensor)")
HIST = define("histogram(Tensor x, Tensor lo, Tensor hi, int bins, int[] block, bool clamp_outside) -> Tensor")
SEARCH = define(
    "range_search(Tensor hist, Tensor lo, Tensor hi, Tensor scale, Tensor zero_point, int qmin, int qmax, "
    "float gamma, bool product) -> (Tensor, Tensor)"
)


def _pshape(shape, block):
    return U.param_shape(shape, block)


def _minmax_impl(device):
    def impl(x, block):
        xc = x.contiguous()
        ps = _pshape(xc.shape, block)
        if device == "cpu":
            mn = torch.empty(ps, dtype=torch.float32)
            mx = torch.empty(ps, dtype=torch.float32)
            _C.minmax_cpu(xc.data_ptr(), U.dtype_code(xc), list(xc.shape), list(block),
                          mn.data_ptr(), mx.data_ptr(), U.nthreads())
            return mn, mx
        mn = torch.full(ps, float("inf"), device=x.device)
        mx = torch.full(ps, float("-inf"), device=x.device)
        nan = torch.zeros(ps, dtype=torch.int32, device=x.device)
        cfn("minmax_cuda")(xc.data_ptr(), U.dtype_code(xc), list(xc.shape), list(block),
                           mn.data_ptr(), mx.data_ptr(), nan.data_ptr(), U.stream(xc))
        nanv = torch.full_like(mn, float("nan"))
        return torch.where(nan != 0, nanv, mn), torch.where(nan != 0, nanv, mx)
    return impl


def _hist_impl(device):
    def impl(x, lo, hi, bins, block, clamp_outside):
        xc = x.contiguous()
        lo_c, hi_c = lo.contiguous(), hi.contiguous()
        counts = torch.zeros((lo_c.numel(), bins), dtype=torch.int64, device=x.device)
        args = (xc.data_ptr(), U.dtype_code(xc), list(xc.shape), list(block), lo_c.data_ptr(),
                hi_c.data_ptr(), bins, clamp_outside, counts.data_ptr())
        if device == "cpu":
            _C.histogram_cpu(*args, U.nthreads())
        else:
            cfn("histogram_cuda")(*args, U.stream(xc))
        return counts
    return impl


def _search_impl(device):
    def impl(hist, lo, hi, scale, zero_point, qmin, qmax, gamma, product):
        h = hist.contiguous()
        C, B = h.shape
        s, z = scale.contiguous(), zero_point.contiguous()
        K1, K2 = s.shape[1], z.shape[1]
        shape = (C, K1, K2) if product else (C, K1)
        mse = torch.empty(shape, dtype=torch.float32, device=h.device)
        cost = torch.empty(shape, dtype=torch.float32, device=h.device)
        args = (h.data_ptr(), lo.contiguous().data_ptr(), hi.contiguous().data_ptr(), C, B,
                s.data_ptr(), K1, z.data_ptr(), K2, product, qmin, qmax, gamma,
                mse.data_ptr(), cost.data_ptr())
        if device == "cpu":
            _C.range_search_cpu(*args, U.nthreads())
        else:
            cfn("range_search_cuda")(*args, U.stream(h))
        return mse, cost
    return impl


register(MINMAX, _minmax_impl("cpu"), _minmax_impl("cuda"))
register(HIST, _hist_impl("cpu"), _hist_impl("cuda"))
register(SEARCH, _search_impl("cpu"), _search_impl("cuda"))


@torch.library.register_fake(MINMAX)
def _(x, block):
    ps = _pshape(x.shape, block)
    return x.new_empty(ps, dtype=torch.float32), x.new_empty(ps, dtype=torch.float32)


@torch.library.register_fake(HIST)
def _(x, lo, hi, bins, block, clamp_outside):
    return x.new_empty((lo.numel(), bins), dtype=torch.int64)


@torch.library.register_fake(SEARCH)
def _(hist, lo, hi, scale, zero_point, qmin, qmax, gamma, product):
    shape = (hist.shape[0], scale.shape[1], zero_point.shape[1]) if product else (hist.shape[0], scale.shape[1])
    return hist.new_empty(shape, dtype=torch.float32), hist.new_empty(shape, dtype=torch.float32)


# ---------------------------------------------------------------- public API
def _squeeze(t, x, spec, axis):
    """Per-tensor stats come back 0-d, per-channel 1-d, per-block in the full-rank shape."""
    if all(b == 0 for b in spec):
        return t.reshape(())
    if axis is not None and sum(b != 0 for b in spec) == 1:
        return t.reshape(-1)
    return t


def minmax(x: torch.Tensor, axis=None, block_size=None):
    """(min, max) of x per tensor, per channel along ``axis``, or per block, in one pass.

    NaN in a group makes that group's min and max NaN (like torch.aminmax).
    """
    U.dtype_code(x)
    spec = U.block_spec(x.shape, axis, block_size)
    mn, mx = torch.ops.rapidquant.minmax(x, spec)
    return _squeeze(mn, x, spec, axis), _squeeze(mx, x, spec, axis)


def histogram(x: torch.Tensor, bins: int, lo, hi, axis=None, clamp: bool = False) -> torch.Tensor:
    """Counts of x in ``bins`` equal bins over [lo, hi], per tensor or per channel (``axis``).

    lo/hi are scalars (per tensor) or one value per channel. Bin b holds values with
    floor((x - lo) * bins / (hi - lo)) == b; x == hi falls in the last bin. Values outside
    [lo, hi] are dropped, or counted in the edge bins with ``clamp=True``; NaN is dropped.
    Returns int64 counts of shape [bins] or [C, bins].
    """
    U.dtype_code(x)
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer (got {bins})")
    spec = U.block_spec(x.shape, axis, None)
    lo_t = U.as_param(lo, x, spec, "lo")
    hi_t = U.as_param(hi, x, spec, "hi")
    counts = torch.ops.rapidquant.histogram(x, lo_t, hi_t, int(bins), spec, bool(clamp))
    return counts.reshape(-1) if axis is None else counts


def range_search(hist, lo, hi, scale, zero_point, qmin: int, qmax: int, gamma: float = 1.0,
                 product: bool = False):
    """Score candidate encodings against histograms in one kernel call.

    hist: [C, B] counts over [lo[c], hi[c]]. Candidates per group: paired ``scale[C, K]`` and
    ``zero_point[C, K]``, or with ``product=True`` every ``scale[C, K1]`` x ``zero_point[C, K2]``.
    Returns (mse, cost), each [C, K] (or [C, K1, K2]): mse is the expected squared error of
    quantize-dequantize using bin midpoints as data; cost weighs the error of clipped bins
    by ``gamma`` (AIMET's SQNR / TF-enhanced criterion; gamma=1 gives mse).
    """
    U.check_qrange(qmin, qmax)
    if hist.dim() == 1:
        hist = hist[None]
    hist = hist.float()
    C = hist.shape[0]
    dev = hist.device

    def vec(t, name):
        t = torch.as_tensor(t, dtype=torch.float32, device=dev).reshape(-1)
        if t.numel() == 1:
            t = t.expand(C)
        if t.numel() != C:
            raise ValueError(f"{name} needs one value per histogram ({C}), got {t.numel()}")
        return t

    def cand(t, name):
        t = torch.as_tensor(t, dtype=torch.float32, device=dev)
        if t.dim() == 1:
            t = t[None].expand(C, -1)
        if t.dim() != 2 or t.shape[0] != C:
            raise ValueError(f"{name} must be [K] or [C, K] with C = {C} (got {tuple(t.shape)})")
        return t

    lo_t, hi_t = vec(lo, "lo"), vec(hi, "hi")
    s, z = cand(scale, "scale"), cand(zero_point, "zero_point")
    if not product and s.shape[1] != z.shape[1]:
        raise ValueError(f"paired candidates need as many scales ({s.shape[1]}) as zero points "
                         f"({z.shape[1]}); use product=True for every combination")
    return torch.ops.rapidquant.range_search(hist, lo_t, hi_t, s, z, int(qmin), int(qmax),
                                             float(gamma), bool(product))


def sqnr_candidates(xmin, xmax, qmin: int, qmax: int, symmetric: bool, num_scales: int | None = None,
                    num_offsets: int = 21):
    """AIMET TF-enhanced candidate grids, per group, as (scale[C, K1], zero_point[C, K2]).

    Asymmetric: scales delta_max * k / (n_s - 1) for k = 1..n_s (n_s = 17) with delta_max =
    (max - min) / (qmax - qmin), and num_offsets zero points spread over [qmin, qmax] plus
    the observed one. Symmetric: 101 scale fractions of 2 * max|x| / (qmax - qmin) with
    the middle zero point. Score them with ``range_search(..., product=True)``.
    """
    xmin = torch.as_tensor(xmin, dtype=torch.float32).reshape(-1).clamp(max=0)
    xmax = torch.as_tensor(xmax, dtype=torch.float32).reshape(-1).clamp(min=0)
    n = float(qmax - qmin)
    if symmetric:
        ns = num_scales or 101
        absmax = torch.maximum(xmax, -xmin)
        dmax = (2 * absmax / n).clamp_min(torch.finfo(torch.float32).tiny)
        frac = torch.arange(1, ns + 1, dtype=torch.float32) / (ns - 1)
        scale = dmax[:, None] * frac[None, :]
        mid = float(round((qmin + qmax) / 2))
        zp = torch.full((xmin.numel(), 1), mid)
        return scale, zp
    ns = num_scales or 17
    dmax = ((xmax - xmin) / n).clamp_min(torch.finfo(torch.float32).tiny)
    frac = torch.arange(1, ns + 1, dtype=torch.float32) / (ns - 1)
    scale = dmax[:, None] * frac[None, :]
    grid = torch.linspace(qmin, qmax, num_offsets - 1).round()
    observed = torch.clamp(torch.round(qmin - xmin / dmax), qmin, qmax)
    zp = torch.cat([grid[None].expand(xmin.numel(), -1), observed[:, None]], dim=1)
    return scale, zp

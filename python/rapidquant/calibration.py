"""Calibration statistics and the analyzers that turn them into encodings.

Statistics do not depend on the bitwidth: a quantizer keeps its running min/max (and,
for histogram schemes, a fixed-width histogram that grows its range by re-binning), so
encodings for any bitwidth can be derived later from the same pass over the data. All
heavy work runs in the rapidquant.ops kernels, per channel in one call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rapidquant import ops

SCHEMES = ("minmax", "percentile", "mse", "sqnr", "entropy")
HIST_SCHEMES = ("percentile", "mse", "sqnr", "entropy")


@dataclass
class Stats:
    """Per-group statistics: min, max and optionally a histogram over [lo, hi]."""
    min: torch.Tensor
    max: torch.Tensor
    hist: torch.Tensor | None = None  # [G, bins] float64 counts
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    batches: int = 0
    sample: torch.Tensor | None = None  # a strided sample of the values (grid-damage check)


SAMPLE_PER_BATCH = 4096
SAMPLE_MAX = 16384


class Observer:
    """Accumulates Stats for one quantizer over calibration batches."""

    def __init__(self, name: str, axis=None, block_size=None, histogram: bool = False,
                 bins: int = 2048, nonfinite: str = "raise"):
        self.name, self.axis, self.block_size = name, axis, block_size
        self.histogram, self.bins, self.nonfinite = histogram, bins, nonfinite
        self.stats: Stats | None = None

    def _groups(self, x: torch.Tensor):
        """A 2-D [G, n] view for histograms: per tensor, per channel, or per block."""
        if self.block_size is None:
            if self.axis is None:
                return x.reshape(1, -1)
            return x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        if not isinstance(self.block_size, int) or (self.axis or 0) != 0:
            raise ValueError(f"quantizer '{self.name}': histogram schemes support per-block encodings "
                             "only as an int block_size along dim 1 with channels on axis 0; "
                             "use scheme='minmax' for other block layouts")
        C, I = x.shape[0], x.shape[1]
        return x.reshape(C * (I // self.block_size), -1)

    def update(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            return  # a constant that reached a quantizer (e.g. a bool flag): nothing to observe
        x = x.detach()
        if not x.is_floating_point():
            return  # integer tensors (indices, masks) are not quantized
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            x = x.float()
        if x.numel() == 0:
            return
        mn, mx = ops.minmax(x, axis=self.axis, block_size=self.block_size)
        if not (torch.isfinite(mn).all() and torch.isfinite(mx).all()):
            if self.nonfinite == "raise":
                raise ValueError(
                    f"calibration data reaching quantizer '{self.name}' contains NaN or Inf "
                    f"(batch {self.stats.batches + 1 if self.stats else 1}). Clean the data or the "
                    "model, or pass QuantSimConfig(nonfinite='ignore') to zero such values during "
                    "calibration.")
            x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
            mn, mx = ops.minmax(x, axis=self.axis, block_size=self.block_size)
        s = self.stats
        if s is None:
            s = self.stats = Stats(mn.clone(), mx.clone())
        else:
            torch.minimum(s.min, mn, out=s.min)
            torch.maximum(s.max, mx, out=s.max)
        s.batches += 1
        if self.axis is None and self.block_size is None:
            _keep_sample(s, x)
        if self.histogram:
            self._update_hist(x, mn.reshape(-1), mx.reshape(-1))

    def _update_hist(self, x, mn, mx):
        s = self.stats
        g = self._groups(x)
        if s.hist is None:
            lo, hi = _widen(mn.clone(), mx.clone())
            s.hist = torch.zeros(lo.numel(), self.bins, dtype=torch.float64, device=x.device)
            s.lo, s.hi = lo, hi
        elif (mn < s.lo).any() or (mx > s.hi).any():
            # grow the range with headroom so later batches rarely force another re-bin
            nlo, nhi = torch.minimum(s.lo, mn), torch.maximum(s.hi, mx)
            pad = 0.25 * (nhi - nlo)
            nlo = torch.where(nlo < s.lo, nlo - pad, s.lo)
            nhi = torch.where(nhi > s.hi, nhi + pad, s.hi)
            s.hist = rebin(s.hist, s.lo, s.hi, nlo, nhi)
            s.lo, s.hi = nlo, nhi
        s.hist += ops.histogram(g, self.bins, s.lo, s.hi, axis=0).double()


def _keep_sample(s: Stats, x: torch.Tensor) -> None:
    """A strided (deterministic) sample of x, up to SAMPLE_MAX values over the first batches."""
    have = 0 if s.sample is None else s.sample.numel()
    if have >= SAMPLE_MAX:
        return
    flat = x.reshape(-1)
    step = max(1, flat.numel() // SAMPLE_PER_BATCH)
    part = flat[::step][:min(SAMPLE_PER_BATCH, SAMPLE_MAX - have)].float().cpu()
    s.sample = part.clone() if s.sample is None else torch.cat([s.sample, part])


def grid_damage(sample: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> dict | None:
    """How a per-tensor grid treats a sample of its data: ``collapsed``, the share of the
    values not already on the grid that land on its most used level (a mel spectrogram
    at 8 bits: nearly all of them on 0); ``clipped``, the share outside the grid;
    ``rel_error``, the median over non-zero values of |q(x) - x| / |x| (a healthy 8-bit
    grid: about 0.01; a residual stream whose outliers set the range: near 1, the typical
    value rounds to zero)."""
    if sample is None or sample.numel() == 0 or scale.numel() != 1:
        return None
    s, z = float(scale.reshape(-1)[0]), float(zero_point.reshape(-1)[0])
    x = sample.double()
    q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
    # within a thousandth of a step counts as on the grid / inside it: the fp32 scale of an
    # exact grid (one-hot 0/1 at 1/255) misses its values by ~1e-7 relative, and a saturated
    # tanh sits exactly half a step past a grid whose zero point was rounded
    tol = 1e-3
    off_grid = ((q - z) * s - x).abs() > tol * s
    clipped = float(((x / s + z) < qmin - 0.5 - tol).sum() + ((x / s + z) > qmax + 0.5 + tol).sum()) / x.numel()
    nonzero = x != 0
    rel = float((((q - z) * s - x).abs()[nonzero] / x.abs()[nonzero]).median()) if nonzero.any() else 0.0
    if not off_grid.any():
        return {"collapsed": 0.0, "clipped": clipped, "level": 0.0, "rel_error": rel}
    levels = (q[off_grid] - qmin).long()
    counts = torch.bincount(levels, minlength=qmax - qmin + 1)
    top = int(counts.argmax())
    return {"collapsed": float(counts[top]) / int(off_grid.sum()), "clipped": clipped,
            "level": (top + qmin - z) * s, "rel_error": rel}


def _widen(lo, hi):
    """Make [lo, hi] a valid histogram range even for constant tensors."""
    width = hi - lo
    tiny = torch.clamp(torch.maximum(lo.abs(), hi.abs()) * 1e-6, min=1e-12)
    bad = width <= tiny
    return torch.where(bad, lo - tiny, lo), torch.where(bad, hi + tiny, hi)


def rebin(hist, lo, hi, nlo, nhi):
    """Re-express histograms over [lo, hi] on the same number of bins over [nlo, nhi] ⊇ [lo, hi].

    Counts are spread uniformly inside each old bin (linear interpolation of the CDF);
    every group at once.
    """
    G, B = hist.shape
    cum = torch.cat([hist.new_zeros(G, 1), hist.cumsum(1)], dim=1)  # [G, B+1]
    k = torch.arange(B + 1, dtype=torch.float64, device=hist.device)
    edges = nlo.double()[:, None] + k[None, :] * ((nhi - nlo).double() / B)[:, None]
    pos = ((edges - lo.double()[:, None]) / (hi - lo).double()[:, None] * B).clamp(0, B)
    i0 = pos.floor().long().clamp(max=B - 1)
    frac = pos - i0.double()
    cdf = cum.gather(1, i0) + frac * hist.gather(1, i0)
    cdf[:, -1] = cum[:, -1]  # exact total
    return cdf.diff(dim=1).clamp_min(0)


# ------------------------------------------------------------------ analyzers
def encoding_range(stats: Stats, scheme: str, qmin: int, qmax: int, symmetric: bool,
                   percentile: float = 99.99, gamma: float = 3.0):
    """The (min, max) per group that a scheme picks for the grid [qmin, qmax]."""
    if scheme == "minmax" or stats.hist is None:
        if scheme != "minmax":
            raise RuntimeError(f"scheme '{scheme}' needs histograms; calibrate with it selected")
        return stats.min, stats.max
    shape = stats.min.shape
    if scheme == "percentile":
        lo, hi = _percentile_range(stats, percentile)
    elif scheme in ("mse", "sqnr"):
        lo, hi = _search_range(stats, qmin, qmax, symmetric, 1.0 if scheme == "mse" else gamma)
    elif scheme == "entropy":
        lo, hi = _entropy_range(stats, qmin, qmax, symmetric)
    else:
        raise ValueError(f"unknown scheme '{scheme}'; choose one of {SCHEMES}")
    return lo.reshape(shape), hi.reshape(shape)


def _percentile_range(stats: Stats, p: float):
    if not 50 <= p <= 100:
        raise ValueError(f"percentile must be in [50, 100] (got {p})")
    h = stats.hist
    G, B = h.shape
    cum = h.cumsum(1)
    total = cum[:, -1:]
    w = ((stats.hi - stats.lo).double() / B)[:, None]

    def value_at(q):  # interpolated inverse CDF
        target = total * q
        idx = torch.searchsorted(cum, target).clamp(max=B - 1)
        prev = torch.where(idx > 0, cum.gather(1, (idx - 1).clamp(min=0)), torch.zeros_like(target))
        cnt = h.gather(1, idx).clamp_min(1e-12)
        frac = ((target - prev) / cnt).clamp(0, 1)
        return (stats.lo.double()[:, None] + (idx.double() + frac) * w).squeeze(1)

    lo = torch.maximum(value_at((100 - p) / 100), stats.min.reshape(-1).double())
    hi = torch.minimum(value_at(p / 100), stats.max.reshape(-1).double())
    return lo.float(), hi.float()


def _search_range(stats: Stats, qmin, qmax, symmetric, gamma):
    mn, mx = stats.min.reshape(-1).float(), stats.max.reshape(-1).float()
    scale, zp = ops.sqnr_candidates(mn.cpu(), mx.cpu(), qmin, qmax, symmetric=symmetric)
    scale, zp = scale.to(mn.device), zp.to(mn.device)
    mse, cost = ops.range_search(stats.hist.float(), stats.lo, stats.hi, scale, zp, qmin, qmax,
                                 gamma=gamma, product=True)
    score = cost.reshape(cost.shape[0], -1)
    best = score.argmin(1)
    k1, k2 = best // zp.shape[1], best % zp.shape[1]
    s = scale.gather(1, k1[:, None]).squeeze(1)
    z = zp.gather(1, k2[:, None]).squeeze(1)
    return (qmin - z) * s, (qmax - z) * s


def _entropy_range(stats: Stats, qmin, qmax, symmetric, num_candidates: int = 48, bins: int = 2048):
    """KL-divergence calibration (TensorRT-style) over clipped ranges, all groups at once.

    A candidate must span at least as many histogram bins as the grid has levels (as in
    TensorRT): a narrower one keeps one level per bin, its quantized histogram equals the
    clipped one, and its KL is 0 however much it clips (that chose 1/48 of the range)."""
    n_levels = qmax - qmin + 1
    if n_levels > 4096:
        return stats.min.reshape(-1), stats.max.reshape(-1)  # 16-bit grids: clipping never pays
    h = stats.hist
    G, B = h.shape
    if B > bins and B % bins == 0:  # coarser bins keep [G, K, bins] small
        h = h.reshape(G, bins, B // bins).sum(-1)
        B = bins
    lo, hi = stats.lo.double(), stats.hi.double()
    w = (hi - lo) / B
    mids = lo[:, None] + (torch.arange(B, dtype=torch.float64, device=h.device) + 0.5)[None] * w[:, None]
    mn, mx = stats.min.reshape(-1).double().clamp(max=0), stats.max.reshape(-1).double().clamp(min=0)
    fracs = torch.linspace(1.0 / num_candidates, 1.0, num_candidates, dtype=torch.float64, device=h.device)
    best_lo, best_hi = mn.clone(), mx.clone()
    best_kl = torch.full((G,), math.inf, dtype=torch.float64, device=h.device)
    for f in fracs:  # candidates (not channels) in the loop; each step is vectorized over groups
        if symmetric:
            a = torch.maximum(-mn, mx) * f
            clo, chi = -a, a
        else:
            clo, chi = mn * f, mx * f
        scale = ((chi - clo) / (qmax - qmin)).clamp_min(1e-12)
        lvl = torch.round((mids - clo[:, None]) / scale[:, None]).clamp(0, qmax - qmin).long()
        inside = (mids >= clo[:, None]) & (mids <= chi[:, None])
        p = h.clone()  # reference: clipped mass moves to the edge bins
        below = (mids < clo[:, None]) & (h > 0)
        above = (mids > chi[:, None]) & (h > 0)
        first = torch.where(inside, torch.arange(B, device=h.device)[None].expand(G, B), B).min(1).values.clamp(max=B - 1)
        last = torch.where(inside, torch.arange(B, device=h.device)[None].expand(G, B), -1).max(1).values.clamp(min=0)
        p = torch.where(below | above, torch.zeros_like(p), p)
        p.scatter_add_(1, first[:, None], (h * below).sum(1, keepdim=True))
        p.scatter_add_(1, last[:, None], (h * above).sum(1, keepdim=True))
        # candidate: the mass inside the range (not the clipped outliers: their absence at the
        # edges is what clipping costs) per level, spread evenly over the level's non-empty bins
        nz = (p > 0).double()
        mass = torch.zeros(G, n_levels, dtype=torch.float64, device=h.device).scatter_add_(1, lvl, h * inside)
        cnt = torch.zeros(G, n_levels, dtype=torch.float64, device=h.device).scatter_add_(1, lvl, nz)
        q = (mass / cnt.clamp_min(1)).gather(1, lvl) * nz
        q = q + 1e-4 * nz * q.sum(1, keepdim=True).clamp_min(1e-300) / B  # smoothed: no empty bin where p has mass
        ps, qs = p / p.sum(1, keepdim=True).clamp_min(1e-300), q / q.sum(1, keepdim=True).clamp_min(1e-300)
        kl = torch.where(ps > 0, ps * torch.log(ps / qs.clamp_min(1e-300)), torch.zeros_like(ps)).sum(1)
        kl = torch.where(inside.sum(1) >= n_levels, kl, torch.full_like(kl, math.inf))
        better = kl < best_kl
        best_kl = torch.where(better, kl, best_kl)
        best_lo = torch.where(better, clo, best_lo)
        best_hi = torch.where(better, chi, best_hi)
    return best_lo.float(), best_hi.float()

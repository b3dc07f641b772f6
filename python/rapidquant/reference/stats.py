"""Reference encoding statistics: grouped min/max, histograms, candidate scoring."""
from __future__ import annotations

import torch

from rapidquant.reference.qdq import expand_param


def _grouped_view(x, spec):
    shape, red = [], []
    for d, b in enumerate(spec):
        if b == 0:
            red.append(len(shape))
            shape.append(x.shape[d])
        else:
            shape += [x.shape[d] // b, b]
            red.append(len(shape) - 1)
    return x.reshape(shape), red


def minmax(x, spec):
    pshape = [1 if b == 0 else s // b for s, b in zip(x.shape, spec)]
    v, red = _grouped_view(x.float(), spec)
    if x.numel() == 0:
        return torch.full(pshape, float("inf")), torch.full(pshape, float("-inf"))
    return v.amin(dim=red).reshape(pshape), v.amax(dim=red).reshape(pshape)


def histogram(x, lo, hi, bins, spec, clamp_outside=False):
    """counts[p, b]: bin b = floor((x - lo) * (bins / (hi - lo))), x == hi in the last bin."""
    nparam = lo.numel()
    pshape = lo.shape
    pidx = expand_param(torch.arange(nparam).reshape(pshape), x.shape, spec)
    lo_x = expand_param(lo.float(), x.shape, spec)
    hi_x = expand_param(hi.float(), x.shape, spec)
    xf = x.float()
    inv = bins / (hi_x - lo_x)
    valid = (xf >= lo_x) & (xf <= hi_x)
    b = torch.where(valid, (xf - lo_x) * inv, torch.zeros_like(xf)).long().clamp(max=bins - 1)
    if clamp_outside:
        b = torch.where(xf < lo_x, 0, torch.where(xf > hi_x, bins - 1, b))
        valid = valid | (xf < lo_x) | (xf > hi_x)
    idx = (pidx * bins + b)[valid]
    return torch.bincount(idx.reshape(-1), minlength=nparam * bins).reshape(nparam, bins)


def range_search(hist, lo, hi, scale, zero_point, qmin, qmax, gamma=1.0, product=False):
    """Expected MSE and clip-weighted cost of each candidate, bin midpoints as data."""
    C, B = hist.shape
    w = (hi.float() - lo.float()) / B
    mids = lo.float()[:, None] + (torch.arange(B, dtype=torch.float32) + 0.5)[None, :] * w[:, None]
    if product:
        K1, K2 = scale.shape[1], zero_point.shape[1]
        s = scale.float()[:, :, None].expand(C, K1, K2).reshape(C, K1 * K2)
        z = zero_point.float()[:, None, :].expand(C, K1, K2).reshape(C, K1 * K2)
    else:
        s, z = scale.float(), zero_point.float()
    v = (mids[:, None, :] / s[:, :, None]).clamp(-4194304.0, 4194304.0)
    r = torch.round(v)
    lq, hq = (qmin - z)[:, :, None], (qmax - z)[:, :, None]
    clipped = (r < lq) | (r > hq)
    err = torch.minimum(torch.maximum(r, lq), hq) * s[:, :, None] - mids[:, None, :]
    e2 = hist.double()[:, None, :] * err.double() * err.double()
    total = hist.double().sum(-1, keepdim=True).clamp_min(1e-300)
    mse = e2.sum(-1) / total
    cost = torch.where(clipped, gamma * e2, e2).sum(-1) / total
    out_shape = (C, scale.shape[1], zero_point.shape[1]) if product else (C, s.shape[1])
    return mse.float().reshape(out_shape), cost.float().reshape(out_shape)

"""Reference AdaRound soft rounding (Nagel et al. 2020) with its regularizer."""
from __future__ import annotations

import torch

from rapidquant.reference.qdq import expand_param

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v):
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def adaround_weight(w, v, scale, zero_point, qmin, qmax, spec, beta=2.0, hard=False):
    """(clamp(floor(w/s) + h(v) + zp, qmin, qmax) - zp) * s and sum(1 - |2h - 1|^beta)."""
    s = expand_param(scale.float(), w.shape, spec)
    z = expand_param(zero_point.float(), w.shape, spec)
    h = (v >= 0).float() if hard else rectified_sigmoid(v)
    u = torch.floor(w / s) + h + z
    out = (torch.clamp(u, qmin, qmax) - z) * s
    reg = torch.zeros((), dtype=torch.float32) if hard else (1 - (2 * h - 1).abs().pow(beta)).sum()
    return out, reg

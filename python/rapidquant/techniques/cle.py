"""Cross-layer equalization: BN folding, cross-layer scaling, high-bias folding."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from rapidquant import graph as G
from rapidquant.techniques.bn_fold import _shape_along, fold_batch_norms_, folded_bn
from rapidquant.techniques.patterns import (CONV_T, CONVS, LAYERS, ModuleGraph, in_axis, is_depthwise, out_axis,
                                            set_module)

# activations that commute with positive per-channel scaling: relu(s x) = s relu(x)
SCALE_INVARIANT = (nn.ReLU, nn.PReLU, nn.LeakyReLU, nn.Identity, nn.Dropout)
BOUNDED = (nn.ReLU6, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.GELU, nn.SiLU)


class ChannelClip(nn.Module):
    """min(max(x, 0), upper[c]): a ReLU6 after cross-layer scaling, exactly (upper = 6 / s_c)."""

    def __init__(self, upper: torch.Tensor, channel_dim: int = 1):
        super().__init__()
        self.register_buffer("upper", upper.float().clone())
        self.channel_dim = channel_dim

    def forward(self, x):
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return torch.minimum(torch.relu(x), self.upper.reshape(shape))


G.register_module(ChannelClip, "Clip")


@dataclass(frozen=True)
class CLEConfig:
    """bounded: what to do with ReLU6 between two layers. "exact" scales through it and
    replaces it by a per-channel clip at 6 / s (same function); "skip" leaves such pairs
    unscaled (AIMET's behaviour) and reports them."""
    bounded: str = "exact"
    fold_bn: bool = True
    high_bias_fold: bool = True
    hbf_sigmas: float = 3.0  # absorb beta - k*|gamma| of the pre-activation into the next layer
    hbf_into_padded: bool = False  # a padded next layer sees zeros, not the absorbed shift, at borders
    sweeps: int = 20               # passes over each chain's pairs (converges for conv-dw-conv)


@dataclass
class CLEResult:
    folded: list = field(default_factory=list)
    scaled: list = field(default_factory=list)       # tuples of layer names equalized together
    skipped: list = field(default_factory=list)      # (layer names, reason)
    high_bias_folded: list = field(default_factory=list)
    relu6: dict = field(default_factory=dict)         # layer -> ReLU6 modules after it
    relu6_replaced: list = field(default_factory=list)
    seconds: float = 0.0


def _r(w: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-channel max |w| along axis."""
    dims = [d for d in range(w.dim()) if d != axis]
    return w.detach().abs().double().amax(dim=dims)


EQUALIZABLE = CONVS + CONV_T + (nn.Linear,)
# between a conv and a Linear: channels survive global pooling, but flattening feature maps
# mixes them with positions, so such pairs are reported rather than scaled
_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool2d, nn.Flatten,
          nn.MaxPool2d, nn.AdaptiveMaxPool2d)


def _reaches_linear_through_pooling(mg: ModuleGraph, cur) -> str | None:
    while cur is not None:
        m = mg.module(cur)
        if isinstance(m, nn.Linear):
            return cur.target
        is_pool = isinstance(m, _POOLS) or (cur.op in ("call_function", "call_method")
                                              and getattr(cur.target, "__name__", cur.target) in
                                              ("flatten", "mean", "adaptive_avg_pool2d", "view", "reshape", "relu"))
        if not is_pool:
            return None
        cur = mg.single_user(cur)
    return None


def _chains(mg: ModuleGraph, res: CLEResult, exact_relu6: bool) -> list[list[str]]:
    """Maximal chains of Conv/Linear layers joined by single-consumer scale-invariant
    activations. Pairs that cannot be scaled exactly are reported in res.skipped."""
    convs = [n for n in mg.module_nodes(EQUALIZABLE)]
    nxt_conv = {}
    relu6_between = res.relu6
    for n in convs:
        cur = mg.single_user(n)
        path_ok, acts = True, []
        while cur is not None and isinstance(mg.module(cur), SCALE_INVARIANT + BOUNDED):
            m = mg.module(cur)
            if isinstance(m, nn.ReLU6) and exact_relu6:
                acts.append(cur)
                cur = mg.single_user(cur)
                continue
            if isinstance(m, BOUNDED):
                path_ok = False
                res.skipped.append(((n.target,), f"followed by {type(m).__name__}: scaling would change "
                                                  "where it saturates, left unscaled"))
                break
            if isinstance(m, nn.PReLU) and m.weight.numel() > 1:
                path_ok = False  # per-channel slopes do not commute with per-channel scales
                res.skipped.append(((n.target,), "followed by a per-channel PReLU: scaling would change "
                                                  "its slopes, left unscaled"))
                break
            acts.append(cur)
            cur = mg.single_user(cur)
        if path_ok and cur is not None and isinstance(mg.module(n), CONVS + CONV_T) \
                and not isinstance(mg.module(cur), EQUALIZABLE):
            lin = _reaches_linear_through_pooling(mg, cur)
            if lin is not None:
                res.skipped.append(((n.target, lin), "conv -> Linear through pooling/flatten: "
                                                     "not equalized"))
        if path_ok and cur is not None and isinstance(mg.module(cur), EQUALIZABLE):
            nxt_conv[n.target] = cur.target
            relu6_between[n.target] = [a.target for a in acts if isinstance(mg.module(a), nn.ReLU6)]
    heads = [n.target for n in convs if n.target not in nxt_conv.values()]
    chains = []
    for h in heads:
        ch = [h]
        while ch[-1] in nxt_conv:
            ch.append(nxt_conv[ch[-1]])
        if len(ch) > 1:
            chains.append(ch)
    return chains


@torch.no_grad()
def _scale_out(layer, s: torch.Tensor) -> None:  # divide output channels by s
    w = layer.weight
    w.copy_((w.double() / _shape_along(s, out_axis(layer), w.dim())).to(w.dtype))
    if layer.bias is not None:
        layer.bias.copy_((layer.bias.double() / s).to(layer.bias.dtype))


@torch.no_grad()
def _scale_in(layer, s: torch.Tensor) -> None:  # multiply input channels by s
    w = layer.weight
    if is_depthwise(layer):  # its input channel c is output channel c
        w.copy_((w.double() * _shape_along(s, 0, w.dim())).to(w.dtype))
    else:
        w.copy_((w.double() * _shape_along(s, in_axis(layer), w.dim())).to(w.dtype))


def _clean(s: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))


def _equalize_pair(l1, l2) -> torch.Tensor:
    r1 = _r(l1.weight, out_axis(l1))
    r2 = _r(l2.weight, 0 if is_depthwise(l2) else in_axis(l2))
    s = _clean(r1 / torch.sqrt(r1 * r2))
    _scale_out(l1, s)
    _scale_in(l2, s)
    return s


def _plain(layer) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, CONVS + CONV_T) and (layer.groups == 1 or is_depthwise(layer))


def equalize(model: nn.Module, dummy_input=None, config: CLEConfig = CLEConfig()) -> CLEResult:
    """Deprecated spelling of ``equalize_(model, config)`` (in place; ``dummy_input`` was never used)."""
    warnings.warn("equalize(model, dummy_input) is deprecated: it works in place, so it is now "
                  "equalize_(model, config) (no dummy input); the old name goes in the next release",
                  DeprecationWarning, stacklevel=2)
    return equalize_(model, config)


def equalize_(model: nn.Module, config: CLEConfig = CLEConfig()) -> CLEResult:
    """Cross-layer equalization in place (Nagel et al. 2019), AIMET's recipe.

    1. Fold BatchNorms (fold_batch_norms_). 2. In every chain of Conv layers joined by
    ReLU/PReLU/LeakyReLU/identity, scale consecutive pairs (and conv-depthwise-conv
    triplets through the pairwise recursion) so each channel's weight range becomes the
    geometric mean of the two layers' ranges. The FP32 function is unchanged. Bounded
    activations (ReLU6, Hardtanh, ...) would change where they saturate: such pairs are
    skipped and reported. 3. High-bias folding moves beta - 3|gamma| of a folded BN
    (when positive) into the next layer's bias; exact where the pre-activation stays
    above that value (the Gaussian 3-sigma assumption), else approximate.
    """
    t0 = time.perf_counter()
    res = CLEResult()
    bn = fold_batch_norms_(model) if config.fold_bn else None
    if bn is not None:
        res.folded = bn.folded
    mg = ModuleGraph(model)
    hidden = {}
    for name, path in mg.inside_opaque(LAYERS):
        hidden.setdefault(path, []).append(name)
    for path, names in hidden.items():
        res.skipped.append((tuple(names), f"inside {path}, which torch.fx cannot trace: not equalized"))
    scales = {}
    if config.bounded not in ("exact", "skip"):
        raise ValueError("CLEConfig.bounded must be 'exact' or 'skip'")
    clips: dict[str, ChannelClip] = {}
    for chain in _chains(mg, res, config.bounded == "exact"):
        mods = [mg.modules[n] for n in chain]
        pairs = []
        for a, b, na, nb in zip(mods, mods[1:], chain, chain[1:]):
            if not (_plain(a) and _plain(b)):
                res.skipped.append(((na, nb), "grouped (non-depthwise) convolution"))
                continue
            if isinstance(a, nn.Linear) != isinstance(b, nn.Linear):
                res.skipped.append(((na, nb), "conv -> Linear (or Linear -> conv) pair: not equalized"))
                continue
            pairs.append((a, b, na, nb))
            res.scaled.append((na, nb))
        # Pairwise scaling of a conv-depthwise-conv chain disturbs the neighbouring pair;
        # a few sweeps converge to the jointly equalized ranges (the triplet solution).
        for sweep in range(config.sweeps):
            worst = 0.0
            for a, b, na, nb in pairs:
                s = _equalize_pair(a, b)
                scales[na] = scales.get(na, torch.ones_like(s)) * s
                worst = max(worst, float((s.log().abs()).max()))
                for r6 in res.relu6.get(na, []):  # keep ReLU6 exact: clip at 6 / s per channel
                    if r6 in clips:
                        clips[r6].upper.div_(s.float())
                    else:
                        # Linear outputs carry channels last ([..., C]), convs on dim 1
                        clips[r6] = ChannelClip(6.0 / s, channel_dim=-1 if isinstance(a, nn.Linear) else 1)
                        set_module(model, r6, clips[r6])
                        res.relu6_replaced.append(r6)
            if worst < 1e-3:
                break
    for name, s in scales.items():  # a folded BN's statistics follow its layer's rescaling
        rec = folded_bn(mg.modules[name])
        if rec is not None:
            rec.scaled(s)
    if config.high_bias_fold and bn is not None:
        for na, nb in res.scaled:
            if na not in bn.bn_params or bn.bn_params[na][1] is None:
                continue
            if not config.hbf_into_padded and _pads(mg.modules[nb]):
                continue
            _high_bias_fold(mg, na, nb, bn.bn_params[na], scales.get(na), config.hbf_sigmas, res)
    res.seconds = time.perf_counter() - t0
    return res


def _pads(layer) -> bool:
    p = getattr(layer, "padding", 0)  # Linear: no padding
    return p == "same" or any(v != 0 for v in (p if isinstance(p, tuple) else (p,)))


def model_module(mg, node):
    """The module a node calls, looked up in the (possibly edited) model."""
    if node is None or node.op != "call_module":
        return None
    return mg.model.get_submodule(node.target)


@torch.no_grad()
def _high_bias_fold(mg, na, nb, gb, s, k, res) -> None:
    l1, l2 = mg.modules[na], mg.modules[nb]
    if l1.bias is None or l2.bias is None or s is None:
        return
    gamma, beta = gb
    gamma = (gamma if gamma is not None else torch.ones_like(beta)).double() / s
    beta = beta.double() / s
    node = next(n for n in mg.nodes if n.target == na)
    after = mg.single_user(node)
    act = model_module(mg, after)
    while isinstance(act, (nn.Identity, nn.Dropout)):  # folded BNs became Identity
        after = mg.single_user(after)
        act = model_module(mg, after)
    relu_between = isinstance(act, (nn.ReLU, nn.PReLU, nn.LeakyReLU, nn.ReLU6, ChannelClip))
    c = torch.clamp(beta - k * gamma.abs(), min=0) if relu_between else beta
    if isinstance(act, (nn.ReLU6, ChannelClip)):
        if isinstance(act, nn.ReLU6):
            return  # a plain ReLU6 (scaling skipped): its fixed bound cannot move
        c = torch.minimum(c, act.upper.double())
        act.upper.sub_(c.float())  # min(relu(y - c), u - c) + c == min(y, u) where y >= c
    if is_depthwise(l2):
        absorbed = l2.weight.double().sum(dim=tuple(range(1, l2.weight.dim()))) * c
    else:
        w2 = l2.weight.double()
        ax = in_axis(l2)
        absorbed = (w2 * _shape_along(c, ax, w2.dim())).sum(dim=tuple(d for d in range(w2.dim()) if d != out_axis(l2)))
    l1.bias.copy_((l1.bias.double() - c).to(l1.bias.dtype))
    rec = folded_bn(l1)
    if rec is not None:
        rec.shifted(c)
    l2.bias.copy_((l2.bias.double() + absorbed).to(l2.bias.dtype))
    res.high_bias_folded.append((na, nb))

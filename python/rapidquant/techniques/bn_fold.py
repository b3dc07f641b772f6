"""Batch-norm folding into neighbouring Conv/ConvTranspose/Linear layers."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from rapidquant.techniques.patterns import BNS, CONV_T, CONVS, LAYERS, ModuleGraph, out_axis, set_module
from rapidquant.int32_bias import fit_int32_biases


FOLDED_BN_ATTR = "rapidquant_folded_bn"  # a plain attribute: deepcopy and QuantSim keep it


@dataclass
class FoldedBN:
    """What a BatchNorm folded into a layer said about that layer's output: per output
    channel y ~ N(beta, gamma^2) (the BN's affine parameters). Analytical bias correction
    uses it after folding (as AIMET does); CLE keeps it in step when it rescales."""
    bn: str
    gamma: torch.Tensor  # float64, per output channel
    beta: torch.Tensor

    def scaled(self, s: torch.Tensor) -> None:
        """The layer's output channels were divided by s."""
        self.gamma, self.beta = self.gamma / s.double(), self.beta / s.double()

    def shifted(self, c: torch.Tensor) -> None:
        """c was subtracted from the layer's output (high-bias folding)."""
        self.beta = self.beta - c.double()


def folded_bn(layer: nn.Module) -> FoldedBN | None:
    """The statistics of the BatchNorm folded into ``layer`` (None when there was none)."""
    return getattr(layer, FOLDED_BN_ATTR, None)


def _record_fold(layer: nn.Module, bn_name: str, bn: nn.Module) -> None:
    n = bn.num_features
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(n, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(n, dtype=torch.float64)
    setattr(layer, FOLDED_BN_ATTR, FoldedBN(bn_name, gamma.cpu().clone(), beta.cpu().clone()))


def unfoldable_reason(bn: nn.Module) -> str | None:
    """Why a BatchNorm cannot be folded whatever its neighbours are (None: it can)."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return ("has no running statistics (track_running_stats=False): it normalizes with each "
                "batch's own statistics, which no fixed weight can reproduce")
    return None


@dataclass
class BNFoldResult:
    folded: list = field(default_factory=list)     # (layer name, bn name, "backward"|"forward")
    not_folded: list = field(default_factory=list)  # (bn name, reason)
    bn_params: dict = field(default_factory=dict)   # layer name -> (gamma, beta) after folding, for HBF
    seconds: float = 0.0


def _bn_affine(bn: nn.Module):
    """(scale, shift) with bn(x) = scale * x + shift per channel, in float64."""
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _shape_along(t: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


@torch.no_grad()
def fold_backward(layer: nn.Module, bn: nn.Module) -> None:
    """layer -> bn  ==>  layer' (weights scaled per output channel, bias absorbs the shift)."""
    scale, shift = _bn_affine(bn)
    w = layer.weight
    ax = out_axis(layer)
    if isinstance(layer, CONV_T) and layer.groups != 1:
        # ConvTranspose weight is [in, out/groups, k]: output channel o = g * (out/groups) + j
        g, opg = layer.groups, w.shape[1]
        s = scale.reshape(g, 1, opg)
        wd = w.double().reshape(g, w.shape[0] // g, opg, *w.shape[2:]) * s.reshape(g, 1, opg, *([1] * (w.dim() - 2)))
        w.copy_(wd.reshape(w.shape).to(w.dtype))
    else:
        w.copy_((w.double() * _shape_along(scale, ax, w.dim())).to(w.dtype))
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    new_b = (b * scale + shift).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b)
    else:
        layer.bias.copy_(new_b)


@torch.no_grad()
def fold_forward(bn: nn.Module, layer: nn.Module) -> None:
    """bn -> layer  ==>  layer' (input channels scaled, bias gets W . shift)."""
    scale, shift = _bn_affine(bn)
    w = layer.weight
    wd = w.double()
    extra = (wd * _shape_along(shift, 1, w.dim())).sum(dim=tuple(range(1, w.dim())))
    w.copy_((wd * _shape_along(scale, 1, w.dim())).to(w.dtype))
    b = layer.bias.double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    new_b = (b + extra).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b)
    else:
        layer.bias.copy_(new_b)


def _forward_ok(layer) -> str | None:
    if isinstance(layer, CONV_T):
        return "the next layer is a transposed conv"
    if isinstance(layer, CONVS):
        if layer.groups != 1:
            return "the next conv is grouped"
        pads = layer.padding if isinstance(layer.padding, tuple) else (layer.padding,)
        if layer.padding == "same" or any(p != 0 for p in pads):
            return "the next conv pads its input (the folded bias would be wrong at the borders)"
    return None


def fold_batch_norms(model: nn.Module, dummy_input=None, fold_forward_too: bool = True) -> BNFoldResult:
    """Deprecated spelling of ``fold_batch_norms_(model)`` (in place; ``dummy_input`` was never used)."""
    warnings.warn("fold_batch_norms(model, dummy_input) is deprecated: it works in place, so it is now "
                  "fold_batch_norms_(model) (no dummy input); the old name goes in the next release",
                  DeprecationWarning, stacklevel=2)
    return fold_batch_norms_(model, fold_forward_too)


def fold_batch_norms_(model: nn.Module, fold_forward_too: bool = True) -> BNFoldResult:
    """Fold every foldable BatchNorm into its neighbour, in place; folded BNs become Identity.

    Backward folds (layer -> BN) come first; then BN -> layer where valid (no padding,
    no groups, not transposed). BNs that cannot be folded are left alone and reported
    with the reason.
    """
    t0 = time.perf_counter()
    res = BNFoldResult()
    mg = ModuleGraph(model)
    used = set()
    for name, path in mg.inside_opaque(BNS):
        res.not_folded.append((name, f"inside {path}, which torch.fx cannot trace (its pairs are not seen)"))
    for node in mg.module_nodes(BNS):
        why = unfoldable_reason(mg.module(node))
        if why:
            res.not_folded.append((node.target, why))
            used.add(node.target)  # reported: neither fold direction may touch it
    for node in mg.module_nodes(LAYERS):
        nxt = mg.single_user(node)
        bn = mg.module(nxt) if nxt is not None else None
        if not isinstance(bn, BNS) or nxt.target in used:
            continue
        layer = mg.module(node)
        if len(mg.users(node)) != 1:
            continue
        if isinstance(layer, CONV_T) and layer.groups not in (1, layer.in_channels):
            continue
        fold_backward(layer, bn)
        _record_fold(layer, nxt.target, bn)
        used.add(nxt.target)
        res.folded.append((node.target, nxt.target, "backward"))
        res.bn_params[node.target] = (bn.weight.detach().clone() if bn.weight is not None else None,
                                      bn.bias.detach().clone() if bn.bias is not None else None)
    for node in mg.module_nodes(BNS):
        if node.target in used:
            continue
        nxt = mg.single_user(node)
        layer = mg.module(nxt) if nxt is not None else None
        if not isinstance(layer, LAYERS):
            res.not_folded.append((node.target, "no single Conv/Linear consumer or producer"))
            continue
        if not fold_forward_too:
            res.not_folded.append((node.target, "forward folding disabled"))
            continue
        why = _forward_ok(layer)
        if isinstance(layer, nn.Linear) and mg.module(node).running_mean.numel() != layer.in_features:
            why = "channel count does not match the Linear input"
        if why:
            res.not_folded.append((node.target, why))
            continue
        fold_forward(mg.module(node), layer)
        used.add(node.target)
        res.folded.append((nxt.target, node.target, "forward"))
    for _, bn_name, _ in res.folded:
        set_module(model, bn_name, nn.Identity())
    res.seconds = time.perf_counter() - t0
    return res


def fold_batch_norms_to_scale(sim) -> BNFoldResult:
    """QAT flow: fold BNs of a QuantSim into the preceding layers' weights *and* their
    per-channel weight quantizers' scales (scale *= |gamma / sigma|), so the quantized
    function stays the same while BN disappears from training. Needs symmetric
    per-channel weight quantizers (signs of negative factors then flip harmlessly)."""
    from rapidquant.qmodules import QuantizedModule
    t0 = time.perf_counter()
    res = BNFoldResult()
    mg = ModuleGraph.__new__(ModuleGraph)
    mg.model, mg.gm = sim.model, sim.model
    mg.modules = dict(sim.model.named_modules())
    mg.nodes = list(sim.model.graph.nodes)
    for node in mg.nodes:
        w = mg.module(node)
        if not isinstance(w, QuantizedModule) or not isinstance(w.module, LAYERS):
            continue
        nxt = mg.single_user(node)
        bw = mg.module(nxt) if nxt is not None else None
        bn = bw.module if isinstance(bw, QuantizedModule) else bw
        if not isinstance(bn, BNS):
            continue
        why = unfoldable_reason(bn)
        if why:
            res.not_folded.append((nxt.target, why))
            continue
        q = w.param_quantizers["weight"] if "weight" in w.param_quantizers else None
        if q is not None and (q.axis is None or not q.symmetric or q.scale is None):
            res.not_folded.append((nxt.target, "needs a calibrated symmetric per-channel weight quantizer"))
            continue
        scale, _ = _bn_affine(bn)
        fold_backward(w.module, bn)
        _record_fold(w.module, nxt.target, bn)
        if q is not None:
            with torch.no_grad():
                q.set_encoding(q.scale.detach() * scale.abs().float().reshape(q.scale.shape), q.zero_point.detach())
            q.frozen = True
        w.clear_cache()
        if isinstance(bw, QuantizedModule):
            bw.module = nn.Identity()
            bw.param_quantizers.clear()
        else:
            set_module(sim.model, nxt.target, nn.Identity())
        res.folded.append((node.target, nxt.target, "backward"))
    fit_int32_biases(sim)  # the folded biases on the frozen, rescaled grids: named where they clip
    res.seconds = time.perf_counter() - t0
    return res

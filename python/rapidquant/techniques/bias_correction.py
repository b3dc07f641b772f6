"""Bias correction: remove the mean output shift that weight quantization causes."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from rapidquant.int32_bias import fit_int32_biases
from rapidquant.progress import progress
from rapidquant.techniques.adaround import SUPPORTED, layer_forward
from rapidquant.batches import model_float_dtype
from rapidquant.techniques.layerwise import collect_batches, run_layerwise, untreated_weights
from rapidquant.techniques.bn_fold import folded_bn
from rapidquant.techniques.patterns import BNS

CONV_T_ALL = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class BiasCorrectionConfig:
    mode: str = "empirical"          # "empirical" (data) or "analytical" (from BN statistics)
    num_batches: int | None = 8
    quantize_activations: bool = True  # empirical: the quantized path includes activation quantizers

    def __post_init__(self):
        if self.mode not in ("empirical", "analytical"):
            raise ValueError("mode must be 'empirical' or 'analytical'")


@dataclass
class BiasCorrectionResult:
    deltas: dict = field(default_factory=dict)   # layer name -> bias change (tensor)
    skipped: list = field(default_factory=list)  # (layer, reason)
    seconds: float = 0.0

    def apply_to(self, model: nn.Module) -> None:
        """Apply the same bias changes to another copy of the model (by layer name)."""
        with torch.no_grad():
            for name, d in self.deltas.items():
                layer = model.get_submodule(name)
                if layer.bias is None:
                    layer.bias = nn.Parameter(torch.zeros_like(d))
                layer.bias.add_(d.to(layer.bias.device))


def _add_bias(layer, delta):
    with torch.no_grad():
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(delta.numel(), device=layer.weight.device))
        layer.bias.add_(delta)


def correct_bias(sim, data=None, config: BiasCorrectionConfig = BiasCorrectionConfig(),
                 show_progress: bool = True) -> BiasCorrectionResult:
    """Correct the biases of the Conv/Linear layers of a calibrated sim (its float master
    biases), so the quantized layers' mean output matches the FP32 model's.

    empirical: per layer in execution order, b -= mean over samples (and positions) of
    (layer_q(x_q) - layer_fp(x_fp)), with x_q from the partially corrected quantized path.
    analytical: for layers fed by a BatchNorm (optionally through ReLU/ReLU6), the input
    mean per channel follows from the BN's beta/gamma (a Gaussian assumption) and
    b -= sum_kernel(W_q - W) . E[x]; no data needed.
    """
    from rapidquant.qmodules import QuantizedModule
    t0 = time.perf_counter()
    res = BiasCorrectionResult()
    targets = {n: m for n, m in sim.model.named_modules()
               if isinstance(m, QuantizedModule) and isinstance(m.module, SUPPORTED)
               and "weight" in m.param_quantizers and m.param_quantizers["weight"].enabled}
    for name, m in sim.model.named_modules():
        if isinstance(m, QuantizedModule) and isinstance(m.module, SUPPORTED) and name not in targets \
                and "weight" in m.param_quantizers:
            res.skipped.append((name, "weight quantizer disabled"))
    res.skipped += untreated_weights(sim, SUPPORTED, "bias correction", set(targets))
    if config.mode == "analytical":
        _analytical(sim, targets, res)
        fit_int32_biases(sim)  # a corrected bias may need a wider weight grid to fit in int32
        res.seconds = time.perf_counter() - t0
        return res
    if data is None:
        raise ValueError("empirical bias correction needs data")
    device = next(sim.model.parameters()).device
    batches = collect_batches(data, config.num_batches, sim.n_inputs, device, dtype=model_float_dtype(sim.model))
    bar = iter(progress(range(len(targets)), total=len(targets), desc="bias correction", enabled=show_progress))

    def on_layer(name, wrapper, q_args, f_args, node):
        layer = wrapper.module
        wq = wrapper.quantized_param("weight")
        with torch.no_grad():
            diff_sum, count = None, 0
            for qa, fa in zip(q_args, f_args):
                d = layer_forward(layer, qa[0], wq) - layer_forward(layer, fa[0], layer.weight)
                ch = d.dim() - 1 if isinstance(layer, nn.Linear) else 1  # output channels
                dims = [i for i in range(d.dim()) if i != ch]
                s = d.double().sum(dim=dims)
                diff_sum = s if diff_sum is None else diff_sum + s
                count += d.numel() // d.shape[ch]
            delta = -(diff_sum / count).float()
        _add_bias(layer, delta)
        res.deltas[name] = delta.cpu()
        next(bar, None)

    run_layerwise(sim, batches, set(targets), on_layer, quantize_activations=config.quantize_activations)
    fit_int32_biases(sim)
    res.seconds = time.perf_counter() - t0
    return res


def _expected_input(gamma, beta, act) -> torch.Tensor | None:
    """E[act(y)] per channel for y ~ N(beta, gamma^2)."""
    beta = beta.detach().double()
    gamma = gamma.detach().double().abs().clamp_min(1e-12)
    if act is None:
        return beta
    normal = torch.distributions.Normal(0.0, 1.0)

    def relu_mean(mu, sd):
        z = mu / sd
        return mu * normal.cdf(z) + sd * torch.exp(normal.log_prob(z))

    if isinstance(act, nn.ReLU):
        return relu_mean(beta, gamma)
    if isinstance(act, nn.ReLU6):  # E[min(relu(y), 6)] = E[relu(y)] - E[relu(y - 6)]
        return relu_mean(beta, gamma) - relu_mean(beta - 6, gamma)
    upper = getattr(act, "upper", None)  # CLE's per-channel clip min(relu(y), u_c)
    if isinstance(upper, torch.Tensor):
        u = upper.detach().double().cpu().reshape(-1)
        return relu_mean(beta, gamma) - relu_mean(beta - u, gamma)
    return None


def _input_distribution(src_module):
    """(gamma, beta) of the distribution of a module's output: a BatchNorm's affine
    parameters, or those of a BatchNorm folded into a layer (kept through folding)."""
    if isinstance(src_module, BNS):
        if src_module.weight is None or src_module.bias is None:
            return None
        return src_module.weight, src_module.bias
    rec = folded_bn(src_module) if src_module is not None else None
    return (rec.gamma, rec.beta) if rec is not None else None


def _source_through_activation(node, inner):
    """Walk back from a layer's input over Identity modules (folded BNs, dropout in eval)
    and at most one ReLU/ReLU6/per-channel clip: (the node producing the statistics, act)."""
    src = node.args[0] if node is not None and node.args else None
    act = None
    while src is not None and src.op == "call_module":
        m = inner(src.target)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            pass
        elif act is None and (isinstance(m, (nn.ReLU, nn.ReLU6)) or type(m).__name__ == "ChannelClip"):
            act = m
        else:
            break
        src = src.args[0] if src.args else None
    return src, act


def _analytical(sim, targets, res) -> None:
    from rapidquant.qmodules import QuantizedModule
    gm = sim.model
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}

    def inner(name):
        m = gm.get_submodule(name)
        return m.module if isinstance(m, QuantizedModule) else m

    for name, wrapper in targets.items():
        node = by_target.get(name)
        src, act = _source_through_activation(node, inner)
        dist = _input_distribution(inner(src.target)) if src is not None and src.op == "call_module" else None
        if dist is None:
            res.skipped.append((name, "not fed by a BatchNorm or a layer with a folded BatchNorm "
                                      "(optionally through ReLU/ReLU6): no input statistics"))
            continue
        ex = _expected_input(*dist, act)
        ex = ex.to(wrapper.module.weight.device) if ex is not None else None
        if ex is None:
            res.skipped.append((name, f"activation {type(act).__name__} has no closed-form mean"))
            continue
        layer = wrapper.module
        with torch.no_grad():
            dw = (wrapper.quantized_param("weight") - layer.weight).double()
            if isinstance(layer, CONV_T_ALL):
                if layer.groups != 1:
                    res.skipped.append((name, "grouped transposed convolution"))
                    continue
                dw = dw.transpose(0, 1)
            per_in = dw.sum(dim=tuple(range(2, dw.dim()))) if dw.dim() > 2 else dw
            if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and layer.groups > 1:
                if layer.groups != layer.in_channels:
                    res.skipped.append((name, "grouped convolution"))
                    continue
                shift = per_in[:, 0] * ex
            else:
                shift = per_in @ ex
            delta = -shift.float().to(layer.weight.device)
        _add_bias(layer, delta)
        wrapper.clear_cache()
        res.deltas[name] = delta.cpu()

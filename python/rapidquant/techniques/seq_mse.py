"""Sequential MSE: per layer, in execution order, pick the weight range that minimizes the
layer's output error on the quantized path's inputs (against the FP32 layer output)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rapidquant import ops
from rapidquant.int32_bias import fit_int32_biases
from rapidquant.progress import progress
from rapidquant.techniques.patterns import out_axis
from rapidquant.techniques.adaround import SUPPORTED, layer_forward, _rows
from rapidquant.batches import model_float_dtype
from rapidquant.techniques.layerwise import (collect_batches, following_activation, run_layerwise,
                                             untreated_weights, check_finite_weights)


@dataclass(frozen=True)
class SeqMSEConfig:
    num_candidates: int = 20
    min_ratio: float = 0.3        # candidates clip the range to min_ratio..1 of |w|max
    num_batches: int | None = 8
    max_rows: int = 512           # rows of cached input used to score candidates
    quantize_activations: bool = False
    use_activation: bool = True   # score after the following activation (ReLU etc.)


@dataclass
class SeqMSEResult:
    layers: dict = field(default_factory=dict)   # name -> chosen ratio(s) (mean over channels)
    skipped: list = field(default_factory=list)  # (layer name, reason): encoding left as calibrated
    seconds: float = 0.0


def _candidates(q, w: torch.Tensor, ratios: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(scale, zero point) for each clip ratio: the weight's own min/max per group (tensor,
    channel or block) shrunk by the ratio, encoded by the quantizer's rules (symmetric or
    asymmetric grid)."""
    mn, mx = ops.minmax(w.float(), axis=q.axis, block_size=q.block_size)
    out = []
    for r in ratios.tolist():
        q.set_range(mn * r, mx * r)
        out.append((q.scale.detach().clone(), q.zero_point.detach().clone()))
    return out


def _choose(q, layer, cands, L: torch.Tensor, ratios: torch.Tensor):
    """Best candidate: per output channel when the encoding has one group (or one row of
    blocks) per output channel, else the one with the smallest total error."""
    if q.axis is None or q.axis != out_axis(layer):
        best = int(L.sum(1).argmin())
        return cands[best][0], cands[best][1], float(ratios[best])
    best = L.argmin(0)  # [C_out]
    C = best.numel()
    S = torch.stack([c[0].reshape(C, -1) for c in cands])  # [K, C, groups per channel]
    Z = torch.stack([c[1].reshape(C, -1) for c in cands])
    idx = best.view(1, C, 1).expand(1, C, S.shape[2])
    shape = cands[0][0].shape
    return (S.gather(0, idx)[0].reshape(shape), Z.gather(0, idx)[0].reshape(shape),
            float(ratios[best].mean()))


def seq_mse(sim, data, config: SeqMSEConfig = SeqMSEConfig(), show_progress: bool = True) -> SeqMSEResult:
    """Set every Conv/Linear weight encoding of ``sim`` by output-error search, in order.

    Per-channel encodings pick the best candidate per output channel independently (the
    output channels of a layer do not interact); per-tensor ones minimize the total. The
    chosen encodings are frozen. Symmetric and asymmetric, per-tensor, per-channel and
    per-block integer weight quantizers; the rest are listed in ``result.skipped``.
    """
    from rapidquant.qmodules import QuantizedModule
    t0 = time.perf_counter()
    check_finite_weights(sim.model)
    sim.calibrate_params()
    targets, res = {}, SeqMSEResult()
    for name, m in sim.model.named_modules():
        if isinstance(m, QuantizedModule) and isinstance(m.module, SUPPORTED) and "weight" in m.param_quantizers:
            q = m.param_quantizers["weight"]
            why = _why_not(q)
            if why:
                res.skipped.append((name, why))
            else:
                targets[name] = m
    res.skipped += untreated_weights(sim, SUPPORTED, "SeqMSE", set(targets))
    device = next(sim.model.parameters()).device
    batches = collect_batches(data, config.num_batches, sim.n_inputs, device, dtype=model_float_dtype(sim.model))
    ratios = torch.linspace(config.min_ratio, 1.0, config.num_candidates)
    bar = iter(progress(range(len(targets)), total=len(targets), desc="SeqMSE", enabled=show_progress))

    def on_layer(name, wrapper, q_args, f_args, node):
        layer, q = wrapper.module, wrapper.param_quantizers["weight"]
        xq = torch.cat([_rows(a[0], layer) for a in q_args])[: config.max_rows]
        xf = torch.cat([_rows(a[0], layer) for a in f_args])[: config.max_rows]
        act = following_activation(sim.model, node) if config.use_activation else None
        w = layer.weight.detach()
        with torch.no_grad():
            y = layer_forward(layer, xf, w)
            y = act(y) if act is not None else y
            cands = _candidates(q, w, ratios)
            ch_axis = 1 if y.dim() > 1 else 0
            losses = []
            for s, z in cands:
                q.set_encoding(s, z)
                out = layer_forward(layer, xq, q(w))
                out = act(out) if act is not None else out
                err = (out - y).pow(2)
                losses.append(err.sum(dim=[d for d in range(err.dim()) if d != ch_axis]))  # per out channel
            L = torch.stack(losses)  # [K, C_out]
            scale, zp, chosen = _choose(q, layer, cands, L, ratios)
            q.set_encoding(scale, zp)
            q.frozen = True
            res.layers[name] = chosen
            wrapper.clear_cache()
        next(bar, None)

    run_layerwise(sim, batches, set(targets), on_layer, quantize_activations=config.quantize_activations)
    chosen = [m.param_quantizers["weight"] for n, m in targets.items() if n in res.layers]
    for q in chosen:  # a chosen grid too fine for its layer's int32 bias is widened, then frozen again
        q.frozen = False
    fit_int32_biases(sim)
    for q in chosen:
        q.frozen = True
    res.seconds = time.perf_counter() - t0
    return res


def _why_not(q) -> str | None:
    if not q.enabled:
        return "weight quantizer disabled"
    if q.frozen:
        return "weight encoding is frozen (set by an earlier technique or loaded)"
    if q.dtype != "int":
        return f"{q.float_format} float weight quantizer: no integer range to search"
    return None



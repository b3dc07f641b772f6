"""Sequential MSE: per layer, in execution order, pick the weight range that minimizes the
layer's output error on the quantized path's inputs (against the FP32 layer output)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rapidquant.progress import progress
from rapidquant.techniques.adaround import SUPPORTED, _layer_forward, _rows
from rapidquant.techniques.layerwise import (collect_batches, following_activation, model_float_dtype, run_layerwise,
                                             untreated_weights)


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


def _candidate_scales(q, w: torch.Tensor, ratios: torch.Tensor):
    """Symmetric scales for each clip ratio: [K, *scale_shape]."""
    qmin, qmax = q.qrange
    if q.axis is None:
        amax = w.abs().max().reshape(())
    else:
        dims = [d for d in range(w.dim()) if d != q.axis]
        amax = w.abs().amax(dim=dims)
    neg = (qmax - qmin + 1) // 2
    return torch.stack([torch.clamp(amax * r / neg, min=1e-12) for r in ratios])


def seq_mse(sim, data, config: SeqMSEConfig = SeqMSEConfig(), show_progress: bool = True) -> SeqMSEResult:
    """Set every Conv/Linear weight encoding of ``sim`` by output-error search, in order.

    Per-channel encodings pick the best candidate per output channel independently (the
    output channels of a layer do not interact); per-tensor ones minimize the total. The
    chosen encodings are frozen. Symmetric weight quantizers only (the usual case).
    """
    from rapidquant.qmodules import QuantizedModule
    t0 = time.perf_counter()
    sim._calibrate_params()
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
    batches = collect_batches(data, config.num_batches, sim._n_inputs, device, dtype=model_float_dtype(sim.model))
    ratios = torch.linspace(config.min_ratio, 1.0, config.num_candidates)
    bar = iter(progress(range(len(targets)), total=len(targets), desc="SeqMSE", enabled=show_progress))

    def on_layer(name, wrapper, q_args, f_args, node):
        layer, q = wrapper.module, wrapper.param_quantizers["weight"]
        xq = torch.cat([_rows(a[0], layer) for a in q_args])[: config.max_rows]
        xf = torch.cat([_rows(a[0], layer) for a in f_args])[: config.max_rows]
        act = following_activation(sim.model, node) if config.use_activation else None
        w = layer.weight.detach()
        qmin, qmax = q.qrange
        with torch.no_grad():
            y = _layer_forward(layer, xf, w)
            y = act(y) if act is not None else y
            cands = _candidate_scales(q, w, ratios).to(w.device)
            ch_axis = 1 if y.dim() > 1 else 0
            losses = []
            for s in cands:
                wq = torch.ops.rapidquant.quantize_dequantize(
                    w, *_param(s, torch.zeros_like(s), w, q.axis), qmin, qmax, _spec(w, q.axis))
                out = _layer_forward(layer, xq, wq)
                out = act(out) if act is not None else out
                err = (out - y).pow(2)
                dims = [d for d in range(err.dim()) if d != ch_axis]
                losses.append(err.sum(dim=dims))  # per output channel
            L = torch.stack(losses)  # [K, C_out]
            if q.axis is None:
                best = int(L.sum(1).argmin())
                scale = cands[best]
                res.layers[name] = float(ratios[best])
            else:
                best = L.argmin(0)
                scale = cands.gather(0, best[None]).squeeze(0) if cands.dim() == 2 else cands[best]
                res.layers[name] = float(ratios[best].mean())
            q.set_encoding(scale, torch.zeros_like(scale))
            q.frozen = True
            wrapper.clear_cache()
        next(bar, None)

    run_layerwise(sim, batches, set(targets), on_layer, quantize_activations=config.quantize_activations)
    res.seconds = time.perf_counter() - t0
    return res


def _why_not(q) -> str | None:
    if not q.enabled:
        return "weight quantizer disabled"
    if q.frozen:
        return "weight encoding is frozen (set by an earlier technique or loaded)"
    if q.dtype != "int":
        return f"{q.float_format} float weight quantizer: no integer range to search"
    if not q.symmetric:
        return "asymmetric weight quantizer: SeqMSE searches symmetric ranges only"
    if q.block_size is not None:
        return "per-block weight quantizer: SeqMSE searches per-tensor or per-channel ranges only"
    return None


def _spec(w, axis):
    spec = [0] * w.dim()
    if axis is not None:
        spec[axis] = 1
    return spec


def _param(s, z, w, axis):
    shape = [1] * w.dim()
    if axis is not None:
        shape[axis] = -1
    return s.reshape(shape).float(), z.reshape(shape).float()

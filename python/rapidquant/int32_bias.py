"""Weight grids coarse enough for the int32 bias of their layer.

A quantized Conv/Gemm adds its bias as int32 on the step s_input * s_weight
(``QuantizedModule.bias_grid``). With 16-bit inputs and weights that step is so fine that an
ordinary bias needs more than 31 bits: the sim clips it, onnxruntime's cast wraps it, and
the layer's output is wrong in both (ImageNet MobileNetV2 after BN folding and CLE at
W16A16: 6 layers per-tensor and 19 per-channel overflow, up to 7.3x, and top-1 agreement
with float falls to 52% and 9%; bench/bench_int32_bias.py). As onnxruntime's quantization tool does, the weight's scale is widened
(per output channel when the weight is per-channel) until the bias fits: the weight gives
up only the resolution its bias could not follow anyway.

``fit_int32_biases(sim)`` runs wherever encodings are set (calibration, scheme and
precision changes, the export); it is idempotent and does not depend on the order of those
changes: it remembers every widening it made, so a widened scale that comes back (a
mixed-precision snapshot re-applied) is measured on its own scale. A frozen weight encoding
(loaded, or chosen by AdaRound, SeqMSE or block reconstruction) is left as it is and its
layer is named in ``sim.saturated_biases`` when it clips.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from rapidquant.qmodules import INT32_BIAS_LIMIT, QuantizedModule

# aim a little below the limit: s_input * s_weight is rounded to float32 before the division
HEADROOM = 1.0 - 2.0 ** -16


@dataclass
class BiasFit:
    """A weight scale widened for its layer's int32 bias: ``base`` is the encoding's own
    scale, ``scale`` the widened one (both on the CPU)."""
    layer: str
    base: torch.Tensor
    scale: torch.Tensor

    @property
    def factor(self) -> float:
        return float((self.scale / self.base).max())

    def why(self) -> str:
        return (f"weight grid {self.factor:.3g}x coarser so the int32 bias fits on s_input * s_weight "
                f"(it needs {31 + math.log2(self.factor):.1f} bits on the calibrated grid)")


def overflow(m: QuantizedModule, weight_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """|bias| / (INT32_BIAS_LIMIT * step) per output channel (above 1: the int32 bias
    saturates) at the weight's scale or ``weight_scale``; None when the layer adds no int32
    bias."""
    step = m.bias_grid(weight_scale)
    if step is None:
        return None
    b = m.module.bias.detach().float().abs().reshape(-1)
    if step.numel() not in (1, b.numel()):
        return None  # a scale that does not run along the bias (grouped ConvTranspose): bias_grid's caller decides
    return b / (step.to(b.device) * INT32_BIAS_LIMIT)


def fit_int32_biases(sim) -> None:
    """Widen each non-frozen integer weight scale whose layer's bias would not fit in int32
    at the current input and weight encodings; undo widenings no longer needed. Records in
    ``sim.bias_fits`` (weight quantizer -> BiasFit, those in effect) and
    ``sim.saturated_biases`` (layer -> why); warns once per layer and kind (``sim.bias_warned``).

    Every widening made is remembered (``sim.bias_fit_history``): a widened scale that comes
    back later (a mixed-precision snapshot re-applied) is recognised, and its own scale is
    the one measured, so the result depends on the encodings, not on their history."""
    history, warned = sim.bias_fit_history, sim.bias_warned
    fits: dict[str, BiasFit] = {}
    saturated: dict[str, str] = {}
    new = []
    for name, m in sim.model.named_modules():
        if not isinstance(m, QuantizedModule) or "weight" not in m.param_quantizers:
            continue
        qw = m.param_quantizers["weight"]
        if qw.scale is None:
            continue
        current = qw.scale.detach().float().cpu()  # compared and computed on the CPU: scales are small
        rec = next((f for f in history.get(qw.name, ()) if f.scale.shape == current.shape
                    and torch.equal(f.scale, current)), None)
        now = overflow(m)
        if qw.frozen:  # learned or loaded: never changed here, only named when it clips
            if rec is not None:
                fits[qw.name] = rec
            if now is not None and now.max() > 1:
                saturated[name] = (f"the int32 bias needs {now.max().item():.3g}x the range of int32 on "
                                   f"s_input * s_weight and the weight encoding is frozen: the deployed layer "
                                   "clips its bias; unfreeze it or give that layer fewer input or weight bits")
            continue
        if now is None:
            if rec is not None:  # no int32 bias any more (e.g. the input went float): the own scale back
                qw.set_encoding(rec.base, qw.zero_point.detach())
            continue
        base = rec.base if rec is not None else current
        need = (now if rec is None else overflow(m, base.to(qw.scale.device))).cpu()  # on the own scale
        factor = need.max().reshape(()) if base.numel() == 1 else need.reshape(base.shape)
        scale = torch.where(factor > HEADROOM, base * factor / HEADROOM, base).reshape(base.shape)
        if torch.equal(scale, base):
            if rec is not None:
                qw.set_encoding(base, qw.zero_point.detach())
            continue
        if not torch.equal(scale, current):
            qw.set_encoding(scale, qw.zero_point.detach())
        fit = next((f for f in history.get(qw.name, ()) if torch.equal(f.base, base) and torch.equal(f.scale, scale)),
                   None)
        if fit is None:
            fit = BiasFit(name, base, scale)
            history.setdefault(qw.name, []).append(fit)
        fits[qw.name] = fit
        if ("fit", name) not in warned:
            warned.add(("fit", name))
            new.append(fit)
    sim.bias_fits, sim.saturated_biases = fits, saturated
    if new:
        worst = max(new, key=lambda f: f.factor)
        warnings.warn(f"{len(new)} layers' biases need more than int32 on the grid s_input * s_weight at these "
                      f"bitwidths ({worst.layer}: {worst.factor:.3g}x); their weight scales were widened until the "
                      "bias fits, as onnxruntime's quantization tool does (sim.bias_fits). Fewer input or weight bits "
                      "for those layers avoid it", stacklevel=3)
    fresh = [n for n in saturated if ("saturated", n) not in warned]
    if fresh:
        warned.update(("saturated", n) for n in fresh)
        warnings.warn(f"int32 bias saturates in {', '.join(fresh)} and their weight encodings are frozen: the "
                      "deployed layers clip their biases (sim.saturated_biases); unfreeze those weight encodings "
                      "or give those layers fewer input or weight bits", stacklevel=3)

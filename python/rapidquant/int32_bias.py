"""Weight grids coarse enough for the int32 bias of their layer.

A quantized Conv/Gemm adds its bias as int32 on the step s_input * s_weight
(``QuantizedModule.bias_grid``). With 16-bit inputs and weights that step is so fine that an
ordinary bias needs more than 31 bits: the sim clips it, onnxruntime's cast wraps it, and
the layer's output is wrong in both (ImageNet MobileNetV2 after BN folding and CLE at
W16A16 per-tensor: 13 layers overflow, up to 3.6x in the first one, and top-1 agreement
falls to 0.29). As onnxruntime's quantization tool does, the weight's scale is widened
(per output channel when the weight is per-channel) until the bias fits: the weight gives
up only the resolution its bias could not follow anyway.

``fit_int32_biases(sim)`` runs wherever encodings are set (calibration, scheme and
precision changes); it is idempotent and does not depend on the order of those changes:
it remembers each widened weight's own encoding and starts from that while the widened
scale is still in place. A frozen weight encoding (loaded, or learned by AdaRound) is
left as it is and its layer is named in ``sim.saturated_biases``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from rapidquant.qmodules import INT32_BIAS_LIMIT, QuantizedModule

# aim a little below the limit: s_input * s_weight is rounded to float32 before the division
HEADROOM = 1.0 - 2.0 ** -16


@dataclass
class BiasFit:
    """A weight scale widened for its layer's int32 bias: ``base`` is the encoding's own
    scale, ``scale`` the widened one now in the quantizer."""
    layer: str
    base: torch.Tensor
    scale: torch.Tensor

    @property
    def factor(self) -> float:
        return float((self.scale / self.base).max())

    def why(self) -> str:
        return (f"weight grid {self.factor:.3g}x coarser so the int32 bias fits on s_input * s_weight "
                f"(it needs {31 + torch.log2(torch.tensor(self.factor)).item():.1f} bits on the calibrated grid)")


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
    ``sim.bias_fits`` (weight quantizer -> BiasFit) and ``sim.saturated_biases`` (layer ->
    why); warns once per layer and kind (``sim.bias_warned``)."""
    fits: dict[str, BiasFit] = getattr(sim, "bias_fits", None) or {}
    saturated: dict[str, str] = {}
    warned = getattr(sim, "bias_warned", None)
    if warned is None:  # a sim-like object built without QuantSim.__init__
        warned = sim.bias_warned = set()
    new = []
    for name, m in sim.model.named_modules():
        if not isinstance(m, QuantizedModule) or "weight" not in m.param_quantizers:
            continue
        qw = m.param_quantizers["weight"]
        rec = fits.get(qw.name)
        if rec is not None and (qw.scale is None or qw.scale.shape != rec.scale.shape
                                or not torch.equal(qw.scale.detach(), rec.scale)):
            fits.pop(qw.name)  # the encoding was set again since: that one is the base now
            rec = None
        now = overflow(m)
        if now is None:
            if rec is not None:  # no int32 bias any more (e.g. the input went float): the own scale back
                qw.set_encoding(rec.base, qw.zero_point.detach())
                fits.pop(qw.name)
            continue
        if qw.frozen:
            if now.max() > 1:
                saturated[name] = (f"the int32 bias needs {now.max().item():.3g}x the range of int32 on "
                                   f"s_input * s_weight and the weight encoding is frozen: the deployed layer "
                                   "clips its bias; unfreeze it or give that layer fewer input or weight bits")
            continue
        need = now if rec is None else overflow(m, rec.base)  # measured on the encoding's own scale
        base = rec.base if rec is not None else qw.scale.detach().clone()
        factor = need.max().reshape(()) if base.numel() == 1 else need.reshape(base.shape)
        scale = torch.where(factor > HEADROOM, base * factor / HEADROOM, base).reshape(base.shape)
        if torch.equal(scale, base):
            if rec is not None:
                qw.set_encoding(base, qw.zero_point.detach())
                fits.pop(qw.name)
            continue
        if rec is None or not torch.equal(scale, rec.scale):
            qw.set_encoding(scale, qw.zero_point.detach())
        fits[qw.name] = BiasFit(name, base, qw.scale.detach().clone())
        if ("fit", name) not in warned:
            warned.add(("fit", name))
            new.append(fits[qw.name])
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

"""AdaRound (Nagel et al. 2020): learn whether each weight rounds up or down.

Per layer, in execution order: the weight encoding (scale, zero point) is fixed; a
continuous V per weight is optimized so that the layer's output on the quantized path's
input matches the FP32 layer's output on the FP32 path's input (asymmetric
reconstruction), with a regularizer that drives the rounding to 0/1. The forward and
backward of the soft rounding run in one fused kernel per step (rapidquant.ops).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rapidquant import distributed as D
from rapidquant import ops
from rapidquant.config import QuantSimConfig
from rapidquant.progress import progress
from rapidquant.batches import cast_floats, model_float_dtype
from rapidquant.modelcopy import bake_computed_weights, copy_model
from rapidquant.qmodules import conv_with_weight
from rapidquant.techniques.fused_adam import FusedAdam
from rapidquant.techniques.layerwise import (collect_batches, following_activation,
                                             run_layerwise, untreated_weights, check_finite_weights)

SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
ZETA, GAMMA = 1.1, -0.1
# past this much cached activation memory, AdaRound's layer cache holds fp16 (cache_fp16=None):
# fp16's 5e-4 relative error is far below a weight grid's, and MobileNetV2's 224x224 maps
# for 128 images would otherwise take over 2 GB in fp32
CACHE_FP16_OVER_MB = 256
# elements per forward/backward piece of a step (output x kernel size): a step over 32
# ImageNet-sized maps is split (gradients summed, the same step) so its memory stays bounded
STEP_PIECE_ELEMENTS = 1 << 23
JOIN_MAX_BYTES = 64 * 2 ** 20  # per-batch cache parts up to this size are concatenated once
# a float target cache up to this size is kept even where it is larger than the layer's input:
# on small maps the memory is nothing, and recomputing was a third of the conv forwards of a
# digits CNN's AdaRound (the demo's time moved under 1%: its steps dominate)
TARGET_CACHE_FREE_BYTES = 64 * 2 ** 20


@dataclass(frozen=True)
class RoundingSettings:
    """What AdaRound and block reconstruction share: the weight grid, the cached data, and
    the optimization of the rounding (soft rounding, annealed regularizer, early stop)."""
    param_bw: int = 4
    per_channel: bool | None = None       # None: the hardware config decides
    block_size: int | None = None         # per-block weight grids (blocks along the input dim)
    param_scheme: str = "mse"
    hw_config: str | dict = "default_per_channel"
    num_batches: int | None = 16          # cached calibration batches
    iterations: int = 500                 # per layer / block, upper bound (early stop may end sooner)
    batch_rows: int = 32                  # rows (samples) per optimization step
    lr: float = 2e-2                      # rounding variables (Adam)
    reg_param: float = 0.01               # lambda
    beta_range: tuple = (20.0, 2.0)
    warm_start: float = 0.2               # fraction of iterations without the regularizer
    early_stop: bool = True
    settled_fraction: float = 1e-2        # stop when fewer weights than this are undecided
    # cached activations in fp16. AdaRound: None (auto) switches to fp16 once its layer cache
    # holds CACHE_FP16_OVER_MB (ImageNet-sized maps), True from the start, False never.
    # Block reconstruction: True keeps the quantized-path values in fp16; None is False.
    cache_fp16: bool | None = None
    memory_budget_mb: float | None = None  # spill activations to disk beyond this
    seed: int = 0
    skip: tuple = ()                      # layer names left with round-to-nearest


@dataclass(frozen=True)
class AdaRoundConfig(RoundingSettings):
    """AdaRound settings. Defaults are tuned to match AIMET's quality (10k iterations,
    lr 1e-3) in a fraction of the steps: a larger learning rate, and an early stop once
    every weight's rounding has settled."""
    use_reference_math: bool = False      # plain torch autograd instead of the fused kernel (benchmarks)


@dataclass
class LayerReport:
    name: str
    iterations: int
    mse_nearest: float   # reconstruction MSE with round-to-nearest weights
    mse_adaround: float  # with the learned (hard) rounding
    flipped: float       # fraction of weights rounded differently from nearest
    seconds: float


@dataclass
class AdaRoundResult:
    model: nn.Module                 # a copy of the input model with the rounded weights
    encodings: dict                  # weight encodings (rapidquant format) to freeze in a sim
    layers: list = field(default_factory=list)
    seconds: float = 0.0
    spilled_bytes: int = 0
    skipped: list = field(default_factory=list)  # (layer name, reason): kept nearest rounding
    # weights before rounding, by weight quantizer name: what a layer moved to another
    # precision (mixed precision) must start from, not the rounded weights
    float_weights: dict = field(default_factory=dict)
    fp16_cached: tuple = (0, 0)      # (layer outputs the cache kept in fp16, all it kept): cache_fp16

    def apply_to(self, sim) -> None:
        """Load and freeze the weight encodings in a sim built on ``self.model``."""
        sim.load_encodings(self.encodings, freeze=True, strict=False)


def _bias(layer: nn.Module, w: torch.Tensor):
    b = layer.bias
    return b.to(w.dtype) if b is not None and b.dtype != w.dtype else b


_CONV_T_FN = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
              nn.ConvTranspose3d: F.conv_transpose3d}


def layer_forward(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's function with weight w (in w's dtype: fp16 layers are optimized in fp32)."""
    x, b = x.to(w.dtype), _bias(layer, w)
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    if type(layer) in _CONV_T_FN:
        return _CONV_T_FN[type(layer)](x, w, b, layer.stride, layer.padding, layer.output_padding,
                                       layer.groups, layer.dilation)
    return conv_with_weight(layer, x, w, b)  # Conv1d/2d/3d, any padding mode


def _rows(t: torch.Tensor, layer) -> torch.Tensor:
    """Linear inputs as [rows, features]; conv inputs keep their samples."""
    return t.reshape(-1, t.shape[-1]) if isinstance(layer, nn.Linear) else t


def joined(parts: list) -> list:
    """The parts as one tensor when that costs little memory (a gather from one tensor per
    step is faster than from many), else as they are."""
    if len(parts) > 1 and sum(p.numel() * p.element_size() for p in parts) <= JOIN_MAX_BYTES:
        return [torch.cat(parts)]
    return parts


def take_rows(parts: list, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of the parts as if concatenated, without concatenating them (fp32)."""
    idx = idx.to(parts[0].device)  # the sampling generator is on the CPU
    if len(parts) == 1:  # index_select: a quarter of indexing's time on 32 rows
        return parts[0].index_select(0, idx).float()
    out = torch.empty((len(idx),) + parts[0].shape[1:], dtype=torch.float32, device=parts[0].device)
    start = 0
    for p in parts:
        sel = (idx >= start) & (idx < start + p.shape[0])
        if sel.any():
            out[sel] = p.index_select(0, idx[sel] - start).float()
        start += p.shape[0]
    return out


def _grid(w, s, z, axis, block):
    """Scale and zero point of a weight quantizer broadcast to w's shape (any layout)."""
    from rapidquant import reference as R
    from rapidquant.ops import _utils as U
    spec = U.block_spec(w.shape, axis, block)
    ps = U.param_shape(w.shape, spec)
    return spec, s.reshape(ps), z.reshape(ps), R.expand_param(s.reshape(ps).float(), w.shape, spec)


def init_rounding(w, s, z, axis, block=None):
    """AdaRound's V with h(V) equal to the fractional part of w / s (round-to-nearest start)."""
    sf = _grid(w, s, z, axis, block)[3]
    frac = (w / sf - torch.floor(w / sf)).clamp(0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)


def reference_soft_weight(w, V, s, z, qmin, qmax, axis, beta, block=None, hard=False):
    """Soft (or hard) rounding in plain torch: benchmarks, and per-block grids, which the
    fused kernel does not take."""
    from rapidquant import reference as R
    spec, sp, zp, _ = _grid(w, s, z, axis, block)
    return R.adaround_weight(w, V, sp, zp, qmin, qmax, spec, beta, hard=hard)


def anneal(it: int, cfg) -> tuple[float, float]:
    """(beta, regularizer weight) at iteration it: no regularizer during the warm start,
    then beta falls from beta_range[0] to beta_range[1] on a cosine (AdaRound's schedule)."""
    warm = int(cfg.warm_start * cfg.iterations)
    b0, b1 = cfg.beta_range
    if it < warm:
        return b0, 0.0
    t = (it - warm) / max(1, cfg.iterations - warm)
    return b1 + 0.5 * (b0 - b1) * (1 + math.cos(math.pi * t)), cfg.reg_param


def soft_weight(w, V, s, z, qrange, axis, beta, block=None, reference=False):
    """(soft-rounded weight, regularizer): the fused kernel, or plain torch for per-block
    grids (which the kernel does not take) and benchmarks."""
    if reference or block is not None:
        return reference_soft_weight(w, V, s, z, *qrange, axis, beta, block)
    return ops.adaround_weight(w, V, s, z, *qrange, axis=axis, beta=beta)


def hard_weight(w, V, s, z, qrange, axis, block=None):
    """The weight with the learned rounding decided (h = V >= 0)."""
    if block is None:
        return ops.adaround_weight(w, V, s, z, *qrange, axis=axis, hard=True)[0]
    return reference_soft_weight(w, V, s, z, *qrange, axis, 0.0, block, hard=True)[0]


@torch.no_grad()
def undecided(V: torch.Tensor) -> float:
    """Fraction of weights whose rounding is not yet 0 or 1 (early stop when small)."""
    h = torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)
    return ((h > 1e-3) & (h < 1 - 1e-3)).float().mean().item()


def reconstruction_loss(out, target, act):
    """Squared error summed over output channels (dim 1), averaged over the rest; one fused
    op, so a step holds no squared-difference copies of the output."""
    if act is not None:
        out, target = act(out), act(target)
    channels = out.shape[1] if out.dim() > 1 else 1
    return F.mse_loss(out, target, reduction="sum") * (channels / max(out.numel(), 1))


@torch.enable_grad()
def optimize_layer(layer, q, xq: list, target: Callable, act, cfg: AdaRoundConfig, gen) -> LayerReport:
    """Learn the rounding of layer's weight. xq: the layer's quantized-path input as a list of
    per-batch row tensors (sampled across, never concatenated); target(idx): the float
    layer's output for those rows, fp32."""
    t0 = time.perf_counter()
    w = layer.weight.detach().float()  # optimized in fp32 whatever the layer dtype
    s, z = q.scale.detach(), q.zero_point.detach()
    qmin, qmax = q.qrange
    axis = q.axis
    block = q.block_size
    V = init_rounding(w, s, z, axis, block).requires_grad_()
    opt = FusedAdam([{"params": [V], "lr": cfg.lr}])  # one kernel per step
    xq = joined(xq)
    n = sum(p.shape[0] for p in xq)
    warm = int(cfg.warm_start * cfg.iterations)
    # a conv's backward on CPU unfolds its input: kernel-size times the output per row
    row_cost = target(torch.zeros(1, dtype=torch.long))[0].numel() * math.prod(w.shape[2:])
    piece = max(1, STEP_PIECE_ELEMENTS // max(1, row_cost))
    it = 0
    for it in range(cfg.iterations):
        idx = torch.randint(0, n, (min(cfg.batch_rows, n),), generator=gen)
        beta, lam = anneal(it, cfg)
        wt, reg = soft_weight(w, V, s, z, (qmin, qmax), axis, beta, block, cfg.use_reference_math)
        opt.zero_grad()
        if len(idx) <= piece:
            loss = reconstruction_loss(layer_forward(layer, take_rows(xq, idx), wt), target(idx), act)
            (loss + lam * reg if lam else loss).backward()
        else:  # the same gradient, summed over pieces of the rows: d(loss)/d(wt), then through wt
            leaf = wt.detach().requires_grad_()
            for c in idx.split(piece):
                part = reconstruction_loss(layer_forward(layer, take_rows(xq, c), leaf), target(c), act)
                (part * (len(c) / len(idx))).backward()
            surrogate = (wt * leaf.grad).sum()
            (surrogate + lam * reg if lam else surrogate).backward()
        if D.active():  # data-parallel: every rank applies the same averaged update
            D.all_reduce(V.grad)
            V.grad /= D.world()
        opt.step()
        if cfg.early_stop and it >= warm and (it - warm) % 50 == 49 and undecided(V) < cfg.settled_fraction:
            break
    with torch.no_grad():
        hard = hard_weight(w, V, s, z, (qmin, qmax), axis, block)
        nearest = ops.quantize_dequantize(w, s, z, qmin, qmax, axis=axis, block_size=block)
        e_near, e_ada = 0.0, 0.0
        m = min(n, 256)
        for c in torch.arange(m).split(min(piece, cfg.batch_rows)):  # peak memory as a step's
            x, y = take_rows(xq, c), target(c)
            e_near += reconstruction_loss(layer_forward(layer, x, nearest), y, act).item() * len(c) / m
            e_ada += reconstruction_loss(layer_forward(layer, x, hard), y, act).item() * len(c) / m
        flipped = (hard != nearest).float().mean().item()
        layer.weight.copy_(hard)
    return LayerReport("", it + 1, e_near, e_ada, flipped, time.perf_counter() - t0)


def float_target(layer: nn.Module, xf: list, store_dtype) -> Callable:
    """target(idx): the float layer's output for rows idx of its float-path input xf (fp32).
    The output is cached (in store_dtype when given) where it takes less memory than the
    input already held, or at most TARGET_CACHE_FREE_BYTES; other layers (MobileNetV2's
    expanding 1x1 convs and depthwise convs on ImageNet maps) recompute it per step instead:
    one forward more per step, the cache's size less."""
    w = layer.weight.detach().clone()  # the float weights: the layer's are rounded in place later
    xf = joined(xf)
    if xf[0].dtype == torch.float16 and w.dtype == torch.float32:
        store_dtype = torch.float16  # the cache went fp16: the target follows it
    with torch.no_grad():
        row = layer_forward(layer, xf[0][:1], w)  # one row decides: a whole part may be large
    size = row.element_size() if store_dtype is None else torch.finfo(store_dtype).bits // 8
    rows = sum(x.shape[0] for x in xf)
    if row[0].numel() * size < xf[0][0].numel() * xf[0].element_size() \
            or row[0].numel() * size * rows <= TARGET_CACHE_FREE_BYTES:
        with torch.no_grad():  # each output cast as it comes: all of them in fp32 at once is the peak
            y = joined([layer_forward(layer, x, w).to(store_dtype or row.dtype) for x in xf])
        return lambda idx: take_rows(y, idx)

    @torch.no_grad()
    def recompute(idx):
        return layer_forward(layer, take_rows(xf, idx), w).float()
    return recompute


def rounding_sim(model: nn.Module, dummy_input, config, sim_config: QuantSimConfig | None, precisions_from=None):
    """(uncalibrated sim, model dtype) for learning the rounding: sim_config (exclusions,
    activations, formats) with the weight settings of config (AdaRound or block
    reconstruction) over it; then each quantizer at its precision in ``precisions_from`` (a
    sim of the same model: a mixed configuration), when given."""
    from rapidquant.quantsim import QuantSim
    check_finite_weights(model)
    dtype = model_float_dtype(model)  # fp32 inputs for an fp16 model are cast, like the batches
    weights = dict(param_bw=config.param_bw, per_channel=config.per_channel, param_scheme=config.param_scheme,
                   hw_config=config.hw_config, block_size=config.block_size)
    sim_cfg = replace(sim_config, **weights) if sim_config is not None else QuantSimConfig(**weights)
    sim = QuantSim(model, cast_floats(dummy_input, dtype), sim_cfg)
    if precisions_from is not None:
        from rapidquant.mixed_precision.manual import copy_precisions
        copy_precisions(precisions_from, sim)
    return sim, dtype


def rounding_targets(sim, skip: tuple, technique: str) -> tuple[dict, list]:
    """({name: wrapper} whose integer weight grid can be learned, [(name, why not)] for the
    weight-bearing layers left with nearest rounding)."""
    from rapidquant.qmodules import QuantizedModule
    targets, skipped = {}, []
    for name, m in sim.model.named_modules():
        if isinstance(m, QuantizedModule) and isinstance(m.module, SUPPORTED) and "weight" in m.param_quantizers:
            q = m.param_quantizers["weight"]
            if name in skip:
                skipped.append((name, f"listed in the {technique} config's skip"))
            elif q.dtype != "int":
                skipped.append((name, f"{q.float_format} float weight quantizer: no integer grid to round on"))
            elif not q.enabled:
                skipped.append((name, "weight quantizer disabled"))
            else:
                targets[name] = m
    return targets, skipped + untreated_weights(sim, SUPPORTED, technique, set(targets))


def adaround(model: nn.Module, dummy_input, data, config: AdaRoundConfig = AdaRoundConfig(),
             show_progress: bool = True, sim_config: QuantSimConfig | None = None,
             precisions_from=None) -> AdaRoundResult:
    """Learn the weight rounding of Conv1d/Conv2d/ConvTranspose2d/Linear layers.

    Returns a copy of the model with rounded weights and the weight encodings to freeze
    in a QuantSim built on that copy (``result.apply_to(sim)``). The input model is not
    modified. Deterministic for a given ``config.seed`` (and thread count). sim_config:
    the QuantSimConfig of the sim the result goes into (its exclusions, symmetry and
    formats); the weight settings of ``config`` override it. precisions_from: a QuantSim of
    this model with a mixed configuration (AMP's choice, ``set_precision``): each layer's
    weights are rounded on the grid of its bitwidth there.
    """
    t0 = time.perf_counter()
    sim, dtype = rounding_sim(model, dummy_input, config, sim_config, precisions_from)
    sim.calibrate_params()
    for q in sim.param_quantizers().values():  # the encodings are final here: their histograms
        q.drop_histogram()                     # would sit in memory through the whole run
    targets, skipped = rounding_targets(sim, config.skip, "AdaRound")
    float_weights = {m.param_quantizers["weight"].name: m.module.weight.detach().clone() for m in targets.values()}
    device = next(model.parameters()).device
    batches = collect_batches(data, config.num_batches, sim.n_inputs, device, shard=D.active(),
                              dtype=dtype)
    gen = torch.Generator().manual_seed(config.seed + 7919 * D.rank())  # each rank samples its own rows
    reports = []
    bar = progress(range(len(targets)), total=len(targets), desc="AdaRound", enabled=show_progress and D.is_main())
    bar_iter = iter(bar)
    store_dtype = torch.float16 if config.cache_fp16 is True else None

    def on_layer(name, wrapper, q_args, f_args, node):
        layer = wrapper.module
        # per-batch lists: the cached inputs are used in place (no copy)
        xq, xf = [_rows(a[0], layer) for a in q_args], [_rows(a[0], layer) for a in f_args]
        act = following_activation(sim.model, node)
        rep = optimize_layer(layer, wrapper.param_quantizers["weight"], xq,
                             float_target(layer, xf, store_dtype), act, config, gen)
        rep.name = name
        wrapper.param_quantizers["weight"].frozen = True
        wrapper.clear_cache()
        reports.append(rep)
        next(bar_iter, None)

    budget = None if config.memory_budget_mb is None else int(config.memory_budget_mb * 2 ** 20)
    half_over = {True: 0, False: None, None: int(CACHE_FP16_OVER_MB * 2 ** 20)}[config.cache_fp16]
    stats = run_layerwise(sim, batches, set(targets), on_layer, quantize_activations=False, budget_bytes=budget,
                          half_over_bytes=half_over)
    out = copy_model(model)
    bake_computed_weights(out)  # as the sim did: the learned weights replace what the layers use
    with torch.no_grad():
        for name, wrapper in targets.items():
            out.get_submodule(name).weight.copy_(wrapper.module.weight)
    from rapidquant.export.encodings import rapidquant_doc
    doc = rapidquant_doc(sim)
    doc["quantizers"] = {k: v for k, v in doc["quantizers"].items() if k in sim.param_quantizers()}
    doc["adaround"] = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()
                                  if not isinstance(v, dict)}}
    return AdaRoundResult(out, doc, reports, time.perf_counter() - t0, stats["spilled_bytes"], skipped,
                          float_weights, (stats["halved_values"], stats["values"]))

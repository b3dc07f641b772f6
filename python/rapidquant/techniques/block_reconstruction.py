"""Block reconstruction (BRECQ, Li et al. 2021) with QDrop (Wei et al. 2022).

AdaRound learns each layer's rounding against that layer's float output. Here the
rounding of every weight in a *block* (a residual block, an attention or MLP sub-block,
a short chain) is learned jointly against the block's float output, together with the
step sizes of the activation quantizers inside it, and, as in QDrop, each quantized
activation is randomly replaced by its float value during learning (probability
``drop_prob``) so the learned rounding tolerates the activation noise it will meet.

Blocks come from the captured graph: a cut falls wherever one value that depends on
weights is live (the input of a residual block, the hidden state between transformer
sub-blocks); values computed from the inputs alone (an attention mask) do not count.
Segments between cuts are merged until a block holds ``min_block_layers`` layers.

Blocks run in order over cached batches, in lockstep with a float twin of the sim:
each block learns on the quantized path's input after all earlier blocks were learned.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from rapidquant import distributed as D
from rapidquant import ops
from rapidquant.config import QuantSimConfig
from rapidquant.memory import release_free_memory
from rapidquant.progress import progress
from rapidquant.quantizer import Quantizer
from rapidquant.techniques.adaround import (CACHE_FP16_OVER_MB, RoundingSettings, anneal, hard_weight,
                                            init_rounding, rounding_sim, rounding_targets, soft_weight, undecided)
from rapidquant.techniques.fused_adam import FusedAdam
from rapidquant.techniques.layerwise import ActivationStore, collect_batches, float_twin, run_node
from rapidquant.modelcopy import bake_computed_weights, copy_model


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# elements a block computes per training piece (autograd keeps about all of them): a step
# over 32 ImageNet-sized rows is split into pieces whose gradients sum to the same step
BLOCK_PIECE_ELEMENTS = 1 << 24
# a block boundary is cached for every row on both paths: values larger than this (per path)
# are kept inside a block instead (MobileNetV2 at 224x224, 128 images: its stem and first expansion)
BOUNDARY_MAX_BYTES = 128 * 2 ** 20


@dataclass(frozen=True)
class BlockReconConfig(RoundingSettings):
    """Block reconstruction settings: the weight grid and rounding optimization as AdaRound
    (iterations are per block); activations as the sim config given to
    ``reconstruct_blocks`` (its act_bw)."""
    lr: float = 5e-2                      # rounding variables (Adam); measured best of 1e-2..8e-2 at 500 it
    learn_act_steps: bool = True          # learn the activation step sizes inside each block (LSQ)
    act_lr: float = 2e-3                  # on log(step): a relative change per step, scale-free
    # learn the (fp32) biases of the block's layers too: they absorb the shift the rounding
    # leaves (digits ResNet W4A8: +0.3 dB logit SQNR at 500 iterations, +0.6 at 2,000)
    bias_lr: float | None = 1e-2
    # QDrop: chance that an activation element stays float while learning. Off by default:
    # measured on 16 configurations (bench/README.md) it lowered logit SQNR in all 16 and cost
    # MobileNetV2 W4A8 2.3 points of agreement; QDrop's paper uses 0.5
    drop_prob: float = 0.0
    min_block_layers: int = 1             # merge graph segments until a block has this many layers

    def __post_init__(self):
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1) (got {self.drop_prob}); 0 turns QDrop off")
        if self.bias_lr is not None and not self.bias_lr >= 0:
            raise ValueError(f"bias_lr must be >= 0 or None (got {self.bias_lr}); None or 0 keeps the biases")
        if self.iterations < 1 or self.min_block_layers < 1:
            raise ValueError("iterations and min_block_layers must be at least 1")


@dataclass
class BlockReport:
    name: str                 # first..last layer of the block
    layers: list
    activation_quantizers: int
    iterations: int
    mse_nearest: float        # block output error: nearest rounding, calibrated steps
    mse_reconstructed: float  # with the learned rounding and steps
    flipped: float            # fraction of the block's weights rounded differently from nearest
    seconds: float


@dataclass
class BlockReconResult:
    model: nn.Module          # a copy of the input model with the learned (rounded) weights
    encodings: dict           # weight and activation encodings (rapidquant format) to freeze in a sim
    blocks: list = field(default_factory=list)
    seconds: float = 0.0
    spilled_bytes: int = 0
    skipped: list = field(default_factory=list)      # (layer name, reason): kept nearest rounding
    float_weights: dict = field(default_factory=dict)  # unrounded weights by weight quantizer name

    def apply_to(self, sim) -> None:
        """Load and freeze the learned encodings in a sim built on ``self.model``."""
        sim.load_encodings(self.encodings, freeze=True, strict=False)


@dataclass
class Block:
    nodes: list               # fx nodes, in execution order
    layers: list              # the target layers (module names) among them


# ---------------------------------------------------------------- finding blocks
def find_blocks(gm: fx.GraphModule, targets: set, min_layers: int = 1, wide: frozenset = frozenset()) -> list[Block]:
    """Partition the graph's nodes into consecutive blocks (see the module docstring).
    Every node belongs to one block; blocks without target layers are only run. No block
    ends at a node in ``wide`` (a value too large to cache for every row: an expanding conv's)."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    pos = {n: i for i, n in enumerate(nodes)}
    weighted = {}
    for n in gm.graph.nodes:
        own = n.op == "get_attr" or (n.op == "call_module" and any(True for _ in gm.get_submodule(n.target)
                                                                      .parameters()))
        weighted[n] = own or any(weighted.get(a, False) for a in n.all_input_nodes)
    live = [0] * (len(nodes) + 1)
    for n in nodes:
        if weighted[n]:
            end = max((pos.get(u, len(nodes)) for u in n.users), default=pos[n] + 1)
            live[pos[n]] += 1
            live[end] -= 1
    segments, cur, count = [], [], 0
    for i, n in enumerate(nodes):
        count += live[i]
        cur.append(n)
        if count <= 1 and n not in wide:
            segments.append(cur)
            cur = []
    if cur:
        segments.append(cur)
    blocks, acc = [], []
    for seg in segments:
        acc += seg
        if sum(n.op == "call_module" and n.target in targets for n in acc) >= min_layers:
            blocks.append(acc)
            acc = []
    if acc:  # the tail: joins the last block when it has too few layers of its own
        if blocks and any(n.op == "call_module" and n.target in targets for n in acc):
            blocks[-1] += acc
        else:
            blocks.append(acc)
    return [Block(b, [n.target for n in b if n.op == "call_module" and n.target in targets]) for b in blocks]


# ---------------------------------------------------------------- learned quantizers
class SoftRounding(nn.Module):
    """AdaRound's soft rounding (V) of one weight on its quantizer's grid, which stays fixed
    while the block learns; set as the wrapper's ``param_overrides["weight"]``."""

    def __init__(self, q: Quantizer, w: torch.Tensor):
        super().__init__()
        self.scale, self.zero_point = q.scale.detach(), q.zero_point.detach()
        self.axis, self.block_size, self.qrange = q.axis, q.block_size, q.qrange
        self.V = nn.Parameter(init_rounding(w.detach().float(), self.scale, self.zero_point, q.axis, q.block_size))
        self.beta, self.reg = 20.0, None

    def forward(self, p):
        wt, self.reg = soft_weight(p.detach().float(), self.V, self.scale, self.zero_point, self.qrange, self.axis,
                                   self.beta, self.block_size)
        return wt.to(p.dtype)

    @torch.no_grad()
    def hard(self, p):
        return hard_weight(p.float(), self.V, self.scale, self.zero_point, self.qrange, self.axis,
                           self.block_size).to(p.dtype)


class _Learning:
    """The state of one block while it learns: soft weights in place of the weight
    quantizers, log-step offsets for the activation quantizers, QDrop in them. ``close``
    writes the learned rounding and steps back and restores the wrappers."""

    def __init__(self, wrappers: dict, acts: list, cfg: BlockReconConfig, gen):
        self.wrappers, self.acts, self.cfg, self.gen = wrappers, acts, cfg, gen
        self.soft, self.grad_was = {}, {}
        for name, w in wrappers.items():
            self.soft[name] = SoftRounding(w.param_quantizers["weight"], w.module.weight)
            w.param_overrides["weight"] = self.soft[name]
            self.grad_was[name] = w.module.weight.requires_grad
            w.module.weight.requires_grad_(False)  # only V learns
            w.clear_cache()
        self.steps = {q: (q.scale.detach().clone(), torch.zeros_like(q.scale, requires_grad=cfg.learn_act_steps))
                      for q in acts}
        groups = [{"params": [s.V for s in self.soft.values()], "lr": cfg.lr}]
        # biases learn through the sim's int32 bias rounding (straight-through); fp32 ones only:
        # Adam's update of an fp16 parameter underflows (eps and squared gradients to 0: NaN)
        self.biases = {name: w.module.bias for name, w in wrappers.items()
                       if cfg.bias_lr and _learnable_bias(w.module)}
        self.bias_grad_was = {name: b.requires_grad for name, b in self.biases.items()}
        for b in self.biases.values():
            b.requires_grad_(True)
        if self.biases:
            groups.append({"params": list(self.biases.values()), "lr": cfg.bias_lr})
        if cfg.learn_act_steps and acts:
            groups.append({"params": [u for _, u in self.steps.values()], "lr": cfg.act_lr})
        self.opt = FusedAdam(groups)  # one kernel per group and step

    def set_drop(self, on: bool) -> None:
        """QDrop in the activation quantizers (the fused kernel), a fresh choice per call."""
        on = on and self.cfg.drop_prob > 0
        for q in self.acts:
            q.qdrop = (self.cfg.drop_prob, _seed(self.gen)) if on else None

    def set_steps(self) -> None:
        for q, (s0, u) in self.steps.items():
            q.scale = s0 * torch.exp(u)  # a differentiable step for this forward pass

    def set_beta(self, beta: float) -> None:
        for s in self.soft.values():
            s.beta = beta

    def regularizer(self):
        return sum(s.reg for s in self.soft.values() if s.reg is not None)

    def step(self, loss=None) -> None:
        """One optimizer step on loss's gradients; loss None: on gradients already accumulated
        (after ``zero_grad`` and a backward per piece of the rows)."""
        if loss is not None:
            self.zero_grad()
            loss.backward()
        if D.active():  # data-parallel: every rank applies the same averaged update
            for g in self.opt.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        D.all_reduce(p.grad)
                        p.grad /= D.world()
        self.opt.step()

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def undecided(self) -> float:
        fr = [undecided(s.V) for s in self.soft.values()]
        return max(fr) if fr else 0.0

    def close(self) -> float:
        """Write back; returns the fraction of weights rounded differently from nearest."""
        self.set_drop(False)
        flipped = total = 0
        with torch.no_grad():
            for name, w in self.wrappers.items():
                soft, p, q = self.soft[name], w.module.weight, w.param_quantizers["weight"]
                del w.param_overrides["weight"]
                hard = soft.hard(p)
                flipped += int((hard != q(p)).sum())
                total += p.numel()
                p.copy_(hard)
                p.requires_grad_(self.grad_was[name])
                if name in self.biases:
                    self.biases[name].requires_grad_(self.bias_grad_was[name])
                q.frozen = True
                w.clear_cache()
            for q, (s0, u) in self.steps.items():
                q.scale = s0  # back to a plain buffer before the encoding is set
                q.set_encoding(s0 * torch.exp(u.detach()), q.zero_point.detach())
                q.frozen = True
        return flipped / max(1, total)


def _learnable_bias(layer) -> bool:
    b = getattr(layer, "bias", None)
    return isinstance(b, nn.Parameter) and b.dtype == torch.float32


def _seed(gen) -> int:
    """A fresh seed for one QDrop choice (the kernels hash it with the element index)."""
    return int(torch.randint(0, 2 ** 62, (1,), generator=gen))


def _learnable_step(q) -> bool:
    """An enabled, calibrated integer activation quantizer with a plain (buffer) step; a
    quantizer that learns its range itself (learn_range) is left to it."""
    return isinstance(q, Quantizer) and q.enabled and q.dtype == "int" and q.scale is not None \
        and not isinstance(q.scale, nn.Parameter)


# ---------------------------------------------------------------- running blocks
def _run(nodes, mods, owner, env: dict) -> dict:
    """Run nodes in order over env (node -> value); returns env with their values."""
    for node in nodes:
        args = fx.node.map_arg(node.args, lambda a: env[a])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
        env[node] = run_node(node, mods, owner, args, kwargs)
    return env


@torch.no_grad()
def _wide_values(gm, fp_mods, fp, batches) -> frozenset:
    """Nodes whose value, over every cached batch, would take more than BOUNDARY_MAX_BYTES
    (measured on the first batch in float, scaled by the batches' row counts)."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = batches[0]
    env = {p: first[i] if i < len(first) else None for i, p in enumerate(placeholders)}
    last_use = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
    rows = [next((t.shape[0] for t in b if isinstance(t, torch.Tensor) and t.dim() > 0), 0) for b in batches]
    scale = sum(rows) / rows[0] if rows[0] else len(batches)
    wide = set()
    for i, n in enumerate(nodes):
        _run([n], fp_mods, fp, env)
        v = env[n]
        nbytes = sum(t.numel() * t.element_size() for t in (v if isinstance(v, (tuple, list)) else [v])
                     if isinstance(t, torch.Tensor))
        if nbytes * scale > BOUNDARY_MAX_BYTES:
            wide.add(n)
        for a in n.all_input_nodes:  # one value at a time, not the whole network's
            if last_use[a] == i:
                del env[a]
    return frozenset(wide)


def _boundary(block: Block) -> tuple[list, list]:
    """(inputs, outputs) of a block: values it reads from before it, values read after it."""
    inside = set(block.nodes)
    ins = []
    for n in block.nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in ins:
                ins.append(a)
    outs = [n for n in block.nodes if any(u not in inside for u in n.users)]  # the output node included
    return ins, outs


def _rows(values: list, n_rows: int, idx):
    """Take rows idx of every value whose first dim is the batch (others unchanged)."""
    return [v.index_select(0, idx.to(v.device)) if isinstance(v, torch.Tensor) and v.dim() > 0
            and v.shape[0] == n_rows else v for v in values]


def _gather(values: list, picked: list, rows: list) -> list:
    """Each cached value over the picked batches: a tensor whose first dim is the batch's row
    count (``rows[b]``) in every picked batch is concatenated; anything else (a shared mask,
    a sequence-first value, a scalar) comes from the first."""
    if len(picked) == 1:
        return [v[picked[0]] for v in values]
    out = []
    for v in values:
        rowwise = all(isinstance(v[b], torch.Tensor) and v[b].dim() > 0 and v[b].shape[0] == rows[b]
                      and v[b].shape[1:] == v[picked[0]].shape[1:] for b in picked)
        out.append(torch.cat([v[b] for b in picked]) if rowwise else v[picked[0]])
    return out


def _error(outs, targets) -> torch.Tensor:
    total = 0.0
    for o, t in zip(outs, targets):
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            d = (o.float() - t.float()).pow(2)
            total = total + (d.sum(1).mean() if d.dim() > 1 else d.mean())
    return total


def _learn_block(ins, outs, q_in, f_in, f_out, learning: _Learning, run_q, cfg, gen, rows: list,
                 piece: int) -> int:
    """Optimize one block; returns the number of iterations run. rows: each cached batch's
    row count (its inputs' first dim). piece: rows per forward/backward (a step over more rows
    sums their gradients: the same step, the memory of one piece)."""
    n_b = len(q_in[0]) if q_in else 1
    warm = int(cfg.warm_start * cfg.iterations)
    # batch_rows beyond one cached batch: rows of several batches per step
    k = max(1, min(n_b, math.ceil(cfg.batch_rows / max(1, min(rows, default=cfg.batch_rows)))))
    it = 0
    for it in range(cfg.iterations):
        picked = torch.randperm(n_b, generator=gen)[:k].tolist() if k > 1 else \
            [int(torch.randint(0, n_b, (1,), generator=gen))]
        cached = _gather(q_in, picked, rows)
        xq, xf, tgt = cached, _gather(f_in, picked, rows), _gather(f_out, picked, rows)
        n = sum(rows[b] for b in picked)
        if n > cfg.batch_rows:
            idx = torch.randperm(n, generator=gen)[: cfg.batch_rows]
            xq, xf, tgt = _rows(xq, n, idx), _rows(xf, n, idx), _rows(tgt, n, idx)
            n = cfg.batch_rows
        if cfg.drop_prob > 0:  # QDrop on the block input too (one fused pass per input)
            xq = [ops.drop_select(q, f.to(q.dtype), cfg.drop_prob, _seed(gen))
                  if isinstance(q, torch.Tensor) and q.dtype in _KERNEL_DTYPES and isinstance(f, torch.Tensor)
                  and f.shape == q.shape else q for q, f in zip(xq, xf)]
        # an in-place op in the block must not change the cache: copy what is still the cached tensor
        xq = [x.clone() if x is c and isinstance(x, torch.Tensor) and x.is_floating_point() else x
              for x, c in zip(xq, cached)]
        beta, lam = anneal(it, cfg)
        learning.set_beta(beta)
        if n <= piece:
            learning.set_steps()
            learning.set_drop(True)
            loss = _error(run_q(ins, xq, outs), tgt)
            if lam:
                loss = loss + lam * learning.regularizer()
            learning.step(loss)
        else:
            learning.zero_grad()
            parts = torch.arange(n).split(piece)
            for j, sel in enumerate(parts):
                learning.set_steps()  # the step graph is freed by each backward
                learning.set_drop(True)
                loss = _error(run_q(ins, _rows(xq, n, sel), outs), _rows(tgt, n, sel)) * (len(sel) / n)
                if lam and j == len(parts) - 1:  # the regularizer once per step
                    loss = loss + lam * learning.regularizer()
                loss.backward()
            learning.step()
        if cfg.early_stop and it >= warm and (it - warm) % 50 == 49 and learning.undecided() < cfg.settled_fraction:
            break
    return it + 1


def _learn_one(blk: Block, wrappers: dict, acts: list, io: tuple, cached: tuple, run_q, cfg, gen,
               rows: list, piece: int) -> BlockReport:
    """Learn one block's rounding and steps; its report (error before/after on a batch)."""
    t0 = time.perf_counter()
    (ins, outs), (q_in, f_in, f_out) = io, cached
    e0 = _block_error(ins, outs, q_in, f_out, run_q)
    learning = _Learning(wrappers, acts, cfg, gen)
    with torch.enable_grad():
        its = _learn_block(ins, outs, q_in, f_in, f_out, learning, run_q, cfg, gen, rows, piece)
    flipped = learning.close()
    e1 = _block_error(ins, outs, q_in, f_out, run_q)
    name = blk.layers[0] if len(blk.layers) == 1 else f"{blk.layers[0]}..{blk.layers[-1]}"
    return BlockReport(name, list(blk.layers), len(acts), its, e0, e1, flipped, time.perf_counter() - t0)


@torch.no_grad()
def _block_error(ins, outs, q_in, f_out, run_q) -> float:
    """Output error on the first cached batch (no drop): before and after learning."""
    return float(_error(run_q(ins, [v[0] for v in q_in], outs), [v[0] for v in f_out]))


def reconstruct_blocks(model: nn.Module, dummy_input, data, config: BlockReconConfig = BlockReconConfig(),
                       show_progress: bool = True, sim_config: QuantSimConfig | None = None,
                       precisions_from=None) -> BlockReconResult:
    """Learn the weight rounding and activation step sizes block by block.

    Returns a copy of the model with rounded weights and the encodings (weights and
    activations) to freeze in a QuantSim built on that copy with the same sim config
    (``result.apply_to(sim)``). The input model is not modified. Deterministic for a
    given ``config.seed`` and thread count. sim_config: the sim the result goes into
    (activation bitwidth, exclusions, formats); the weight settings of ``config`` override it.
    precisions_from: a QuantSim of this model with a mixed configuration (AMP's choice,
    ``set_precision``, 8-bit first and last layers): every quantizer learns at its precision
    there (build the result's sim the same way before ``apply_to``).
    """
    t0 = time.perf_counter()
    sim, dtype = rounding_sim(model, dummy_input, config, sim_config, precisions_from)
    device = next(model.parameters()).device
    batches = collect_batches(data, config.num_batches, sim.n_inputs, device, shard=D.active(), dtype=dtype)
    sim.compute_encodings(batches, show_progress=False, shard=False)  # batches are this rank's already
    for q in sim.quantizers().values():  # learning starts from these encodings; their histograms
        q.drop_histogram()               # would sit in memory through the whole run
    targets, skipped = rounding_targets(sim, config.skip, "block reconstruction")
    float_weights = {m.param_quantizers["weight"].name: m.module.weight.detach().clone() for m in targets.values()}

    gm = sim.model
    fp = float_twin(gm)
    q_mods, fp_mods = dict(gm.named_modules()), dict(fp.named_modules())
    blocks = find_blocks(gm, set(targets), config.min_block_layers, _wide_values(gm, fp_mods, fp, batches))
    output_uses = set(next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes)
    # the float path (targets, QDrop's float inputs) goes fp16 past the same size as AdaRound's
    # cache (cache_fp16=None); the quantized path stays as the sim computes it
    store = ActivationStore(None if config.memory_budget_mb is None else int(config.memory_budget_mb * 2 ** 20),
                            int(CACHE_FP16_OVER_MB * 2 ** 20) if config.cache_fp16 is None else None)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, ph in enumerate(placeholders):
        vals = [b[i] if i < len(b) else None for b in batches]
        store.put(("q", ph), vals)
        store.put(("f", ph), vals)
    later = {}  # node -> index of the last block that reads it
    for k, blk in enumerate(blocks):
        for n in blk.nodes:
            for a in n.all_input_nodes:
                later[a] = k
    gen = torch.Generator().manual_seed(config.seed + 7919 * D.rank())
    store_dtype = torch.float16 if config.cache_fp16 else None
    rows = [next((t.shape[0] for t in b if isinstance(t, torch.Tensor) and t.dim() > 0), 0) for b in batches]

    def run_path(path, blk, ins, values, outs, sizes=None):
        mods, owner = (q_mods, gm) if path == "q" else (fp_mods, fp)
        env = _run(blk.nodes, mods, owner, dict(zip(ins, values)))
        if sizes is not None:  # elements the block computes: what a training step holds per row
            sizes.append(sum(v.numel() for v in env.values() if isinstance(v, torch.Tensor)))
        return [env[o] for o in outs]

    def store_outs(path, outs, per_batch, halved=None):
        for j, o in enumerate(outs):
            vals = [r[j] for r in per_batch]
            if store_dtype is not None and path == "q":
                vals = [v.to(store_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                        for v in vals]
            store.put((path, o), vals, None if halved is None else [h[j] for h in halved])

    reports = []
    n_learn = sum(1 for b in blocks if b.layers)
    bar = progress(range(n_learn), total=n_learn, desc="block reconstruction",
                   enabled=show_progress and D.is_main())
    bar_iter = iter(bar)
    try:
        for k, blk in enumerate(blocks):
            ins, outs = _boundary(blk)
            q_in = [store.get(("q", a)) for a in ins]
            f_in = [store.get(("f", a)) for a in ins]
            f_read = [store.reader(("f", a)) for a in ins]
            n_b = len(batches)
            sizes, f_res, f_halved, half_f = [], [], [], store.halving()
            with torch.no_grad():
                for b in range(n_b):
                    args = [rd(b, v[b]) for v, rd in zip(f_in, f_read)]
                    r = run_path("f", blk, ins, args, outs, None if b else sizes)
                    kept = [store.half(t) for t in r] if half_f else r
                    f_res.append(kept)
                    f_halved.append([k is not t for k, t in zip(kept, r)])
            piece = max(1, BLOCK_PIECE_ELEMENTS * rows[0] // sizes[0]) if rows[0] and sizes[0] else config.batch_rows
            f_out = [[r[j] for r in f_res] for j in range(len(outs))]
            if blk.layers:
                acts = [q for q in (getattr(q_mods[n.target], "output_quantizer", None) for n in blk.nodes
                                    if n.op == "call_module") if _learnable_step(q)]
                q_in_f = [[v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.float16 and store_dtype
                           else v for v in vals] for vals in q_in]
                reports.append(_learn_one(blk, {n: targets[n] for n in blk.layers}, acts, (ins, outs),
                                          (q_in_f, f_in, f_out), lambda i, v, o, b=blk: run_path("q", b, i, v, o),
                                          config, gen, rows, piece))
                next(bar_iter, None)
            with torch.no_grad():
                q_res = [run_path("q", blk, ins, [v[b] for v in q_in], outs) for b in range(n_b)]
            store_outs("q", outs, q_res)
            store_outs("f", outs, f_res, f_halved)
            for a in ins:  # free what no later block reads
                if later.get(a, -1) <= k and a not in output_uses:
                    store.drop(("q", a))
                    store.drop(("f", a))
            release_free_memory()  # its steps' values, freed outside the store (which releases its own)
    finally:
        store.close()
    out = copy_model(model)
    bake_computed_weights(out)  # as the sim did: the learned weights replace what the layers use
    with torch.no_grad():
        for name, wrapper in targets.items():
            layer = out.get_submodule(name)
            layer.weight.copy_(wrapper.module.weight)
            if config.bias_lr and _learnable_bias(wrapper.module):
                layer.bias.copy_(wrapper.module.bias)  # learned with the rounding
    from rapidquant.export.encodings import rapidquant_doc
    doc = rapidquant_doc(sim)
    doc["block_reconstruction"] = {"config": {k: (list(v) if isinstance(v, tuple) else v)
                                              for k, v in asdict(config).items() if not isinstance(v, dict)}}
    return BlockReconResult(out, doc, reports, time.perf_counter() - t0, store.spilled_bytes, skipped,
                            float_weights)

"""Ops that converters spell out as arithmetic, recognised as one op for placement.

ONNX exporters and onnx2torch often write hardswish as ``x * clip(x + 3, 0, 6) / 6`` and
hardsigmoid as ``clip(x + 3, 0, 6) / 6`` (or ``clip(x / 6 + 0.5, 0, 1)``), a batch norm (or a
learnable per-channel affine) after a conv as ``conv * scale + shift``, and layer and RMS norms
as means, squares and square roots (JAX's mean(x^2) - mean(x)^2 among them). Quantizing every
step puts 8-bit grids where a runtime that fuses the op has none: ``x * clip(...)`` spans six
times the activation's range. On a PP-OCR detector those steps cost 6 dB of output SQNR
(9.9 -> 13.4 dB with them recognised); quantizing each step of a variance cost a JAX-converted
file classifier everything (-3.0 -> 30.0 dB). QuantSim quantizes only such an op's result.

A hardswish or hardsigmoid is recognised by what it computes, not by how it is spelled:
starting from a Clip, the chain walks back through steps that combine one value with a
scalar constant and forward through such steps and the product with the chain's input, and
is evaluated on a test ramp. Whatever op types the converter used (a Div module, a Mul by
1/6, ReLU6 or clamp), it matches when its values are hardswish's or hardsigmoid's. Norms are
found the same way (see find_spelled_norms). A batch norm is a run of Mul/Add/Sub/Div by
per-channel constants right after a layer, with a scale and a shift; it fuses as the hardware
config fuses that layer with BatchNormalization.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from rapidquant import graph as G

_RAMP = torch.linspace(-8.0, 8.0, 161)
_TARGETS = (("HardSwish", F.hardswish(_RAMP)), ("HardSigmoid", F.hardsigmoid(_RAMP)))
_MAX_STEPS = 3  # scalar steps on either side of the Clip (x/6 + 0.5 is two)


def _scalar(gm: fx.GraphModule, a):
    """a as a one-element tensor when it is a Python number or a one-element constant attribute."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return torch.tensor(float(a))
    if isinstance(a, fx.Node) and a.op == "get_attr":
        t = _attr(gm, a.target)
        if isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point():
            return t.detach().reshape(()).float()
    return None


def _attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _stateless(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op in ("call_function", "call_method"):
        return True
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        return next(m.parameters(), None) is None and next(m.buffers(), None) is None
    return False


def _run(gm: fx.GraphModule, n: fx.Node, val):
    args, kwargs = fx.node.map_arg(n.args, val), fx.node.map_arg(n.kwargs, val)
    if n.op == "call_module":
        return gm.get_submodule(n.target)(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    return n.target(*args, **kwargs)


def _step_input(gm, node: fx.Node):
    """The one node input of a step that combines it with scalar constants only, else None."""
    if not _stateless(gm, node) or node.kwargs.get("out") is not None:
        return None  # stateless modules only (ReLU6, a converter's Div): layers are not steps
    nodes = [a for a in node.args if isinstance(a, fx.Node) and _scalar(gm, a) is None]
    others = [a for a in node.args if not (isinstance(a, fx.Node) and _scalar(gm, a) is None)]
    if len(nodes) != 1 or any(_scalar(gm, a) is None and a is not None for a in others):
        return None
    if any(isinstance(v, fx.Node) and _scalar(gm, v) is None for v in node.kwargs.values()):
        return None
    return nodes[0]


def _evaluate(gm: fx.GraphModule, chain: list, x: fx.Node) -> torch.Tensor | None:
    """The chain's output for the test ramp as x (None when a step does not run on it)."""
    env = {x: _RAMP}
    try:
        with torch.no_grad():
            for n in chain:
                out = _run(gm, n, lambda a: env[a] if a in env else _scalar(gm, a))
                if not isinstance(out, torch.Tensor) or out.shape != _RAMP.shape:
                    return None
                env[n] = out
    except Exception:  # a step that is not elementwise arithmetic on a 1-D ramp: no match
        return None
    return env[chain[-1]]


def _matches(values: torch.Tensor | None) -> str | None:
    if values is None:
        return None
    for name, want in _TARGETS:
        if torch.allclose(values.float(), want, atol=1e-5, rtol=1e-5):
            return name
    return None


def find_decomposed_activations(gm: fx.GraphModule, clip_nodes) -> dict:
    """{output node: (activation name, interior nodes)} for every spelled-out hardswish or
    hardsigmoid that passes through one of ``clip_nodes`` (Clip or HardSigmoid ops). Interior nodes are used only inside
    the chain, so their values never leave it unquantized."""
    found = {}
    for clip in clip_nodes:
        back, x = [], clip
        while len(back) <= _MAX_STEPS:   # x + 3 (or x / 6 + 0.5) before the clip
            inp = _step_input(gm, x)
            if inp is None:
                break
            back.insert(0, x)
            x = inp
        for start in range(len(back)):  # from the longest lead-in to the clip alone
            src = back[start - 1] if start else x
            chain = back[start:]
            best = _extend(gm, chain, src)
            if best is not None:
                out, name, interior = best
                found[out] = (name, interior)
                break
    return found


def _extend(gm, chain: list, x: fx.Node):
    """Walk forward from the chain's last node (scalar steps, or the product with x) and return
    (output, name, interior) for the longest prefix that computes a known activation."""
    best = None
    name = _matches(_evaluate(gm, chain, x))
    if name is not None:
        best = (chain[-1], name, list(chain[:-1]))
    chain = list(chain)
    for _ in range(_MAX_STEPS):
        users = list(chain[-1].users)
        if len(users) != 1:
            break
        u = users[0]
        inputs = [a for a in u.args if isinstance(a, fx.Node)]
        is_product = len(inputs) == 2 and set(inputs) == {chain[-1], x}
        if not is_product and _step_input(gm, u) is not chain[-1]:
            break
        chain.append(u)
        name = _matches(_evaluate(gm, chain, x))
        if name is not None:
            best = (u, name, list(chain[:-1]))
    if best is None:
        return None
    out, name, interior = best
    inside = set(interior) | {out}
    if any(u not in inside for n in interior for u in n.users):
        return None  # an interior value is read elsewhere: it keeps its quantizer
    return best


_AFFINE = ("Mul", "Add", "Sub", "Div")


def _per_channel_constant(gm: fx.GraphModule, a, from_end: int | None) -> bool:
    """a is a number, or a constant attribute that varies along the channel dim at most (the
    dim ``from_end`` places from the end of the layer's output; None: scalars only)."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return True
    if not (isinstance(a, fx.Node) and a.op == "get_attr"):
        return False
    t = _attr(gm, a.target)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return False
    if t.numel() == 1:
        return True
    sizes = [d for d in range(t.dim()) if t.shape[d] != 1]
    return from_end is not None and len(sizes) == 1 and t.dim() - sizes[0] == from_end


def _channel_from_end(info) -> int | None:
    """Where a layer's output channels sit, counted from the end: a conv's output has the
    weight's rank (N, C, spatial...), a linear's features are last."""
    w = getattr(info.module, "weight", None) if info.module is not None else None
    if not isinstance(w, torch.Tensor):
        return None
    return 1 if info.op_type == "Gemm" else w.dim() - 1


def _affine_run(gm: fx.GraphModule, node: fx.Node, by_node: dict, from_end: int | None) -> list:
    """The Mul/Add/Sub/Div by constants (per-channel along ``from_end``, or scalars) that follow
    node, each the only user of the one before."""
    run, cur = [], node
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        ui = by_node.get(u)
        if ui is None or ui.op_type not in _AFFINE or u.kwargs or len(u.args) != 2:
            break
        others = [a for a in u.args if a is not cur]
        if len(others) != 1 or (ui.op_type in ("Sub", "Div") and u.args[0] is not cur):
            break  # c - x or c / x is not an affine map of x
        if not _per_channel_constant(gm, others[0], from_end):
            break
        run.append(u)
        cur = u
    return run


def spelled_batch_norms(gm: fx.GraphModule, infos, fusable: set) -> dict:
    """{layer node: [affine nodes]}: runs of Mul/Add/Sub/Div by per-channel constants, with both
    a scale and a shift, that follow a layer whose op type is in ``fusable`` (those the hw
    config fuses with a BatchNormalization)."""
    by_node = {i.node: i for i in infos}
    runs = {}
    for info in infos:
        if info.op_type not in fusable:
            continue
        run = _affine_run(gm, info.node, by_node, _channel_from_end(info))
        kinds = {by_node[n].op_type in ("Mul", "Div") for n in run}
        if kinds == {True, False}:  # a scale and a shift; a lone rescale (attention's q * d^-0.5) is not a norm
            runs[info.node] = run
    return runs


_NORM_WINDOW = 40   # graph nodes after its input a spelled-out normalization may span
# name -> (dim, centred): layer norms over the last dim or the channels, and RMS norms
_NORMS = {"LayerNormalization": (-1, True), "LayerNormalization(channels)": (1, True),
          "RMSNormalization": (-1, False)}


def _normalized(x: torch.Tensor, dim: int, centred: bool) -> torch.Tensor:
    if centred:
        x = x - x.mean(dim, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(dim, keepdim=True))


def _per_channel_affine_of(value: torch.Tensor, ref: torch.Tensor, dim: int) -> bool:
    """value == ref * gamma + beta for some gamma (not all zero), beta per channel along dim."""
    if value.shape != ref.shape:
        return False
    v, r = value.movedim(dim, -1).reshape(-1, value.shape[dim]), ref.movedim(dim, -1).reshape(-1, ref.shape[dim])
    rc, vc = r - r.mean(0), v - v.mean(0)
    gamma = (rc * vc).sum(0) / (rc * rc).sum(0).clamp_min(1e-12)
    fit = rc * gamma + v.mean(0)
    scale = v.abs().max().clamp_min(1e-6)
    return bool(gamma.abs().max() > 1e-6 * scale and (fit - v).abs().max() <= 1e-3 * scale)


_UNKNOWN = object()


def _constant(gm: fx.GraphModule, a: fx.Node, cache: dict, depth: int = 0):
    """a's value when it depends on no input (attributes, shape arithmetic, ops on those), else
    raise LookupError."""
    if a in cache:
        if cache[a] is _UNKNOWN:
            raise LookupError(a.name)
        return cache[a]
    cache[a] = _UNKNOWN  # until proven constant (also: a failure is not retried)
    if a.op == "get_attr":
        v = _attr(gm, a.target)
    elif "rq_const" in a.meta:
        v = a.meta["rq_const"]
    elif depth < 8 and _stateless(gm, a) and a.all_input_nodes:
        with torch.no_grad():
            v = _run(gm, a, lambda b: _constant(gm, b, cache, depth + 1))
    else:
        raise LookupError(a.name)
    cache[a] = v
    return v


def _inputs_known(gm, n: fx.Node, inside: set, cache: dict) -> bool:
    for a in n.all_input_nodes:
        if a in inside:
            continue
        try:
            _constant(gm, a, cache)
        except Exception:  # an input of the model reaches it, or it does not run here
            return False
    return True


def find_spelled_norms(gm: fx.GraphModule) -> dict:
    """{output node: (name, interior nodes)} for every layer normalization written as arithmetic
    ((x - mean) / sqrt(var + eps), var as mean((x - mean)^2) or mean(x^2) - mean^2, times and plus
    per-channel constants; over the last dim or the channels) and every RMS norm
    (x * rsqrt(mean(x^2) + eps) * weight), recognised by evaluating the ops
    that follow each value read twice on a random tensor of its shape (``node.meta["rq_shape"]``
    from the capture's run; shape arithmetic from ``node.meta["rq_const"]``). The output is the
    last node of the run that still equals a normalization times and plus per-channel values."""
    nodes = list(gm.graph.nodes)
    found, taken, consts = {}, set(), {}  # constants do not depend on the candidate: one cache
    g = torch.Generator().manual_seed(0)
    for i, x in enumerate(nodes):
        shape = x.meta.get("rq_shape")
        if not shape or len(shape) < 2 or len(x.users) < 2 or x in taken or "rq_const" in x.meta:
            continue
        region, inside = [], {x}
        for n in nodes[i + 1: i + 1 + _NORM_WINDOW]:
            if n not in taken and _stateless(gm, n) and any(a in inside for a in n.all_input_nodes) \
                    and _inputs_known(gm, n, inside, consts):
                region.append(n)
                inside.add(n)
        if len(region) < 3:
            continue
        sample = torch.randn(shape, generator=g) * 3 + 1
        refs = {name: _normalized(sample, d, c) for name, (d, c) in _NORMS.items()}
        best = None
        for n, value in _region_values(gm, region, x, sample, consts):
            name = next((k for k, (d, _) in _NORMS.items() if _per_channel_affine_of(value, refs[k], d)), None)
            if name is None:
                continue
            interior = _ancestors_within(n, set(region))
            if all(u in interior or u is n for m in interior for u in m.users):
                best = (n, name, interior)
        if best is not None:
            n, name, interior = best
            found[n] = (name, interior)
            taken.update(interior, (n,))
    return found


def _region_values(gm, region: list, x: fx.Node, sample: torch.Tensor, consts: dict):
    """(node, value) for the region's nodes in order, run on ``sample`` as x, up to the first
    that does not run (or does not give a float tensor)."""
    env = {x: sample}
    with torch.no_grad():
        for n in region:
            try:
                out = _run(gm, n, lambda a: env[a] if a in env else _constant(gm, a, consts))
            except Exception:  # not arithmetic on a tensor of this shape: the region ends here
                return
            if not (isinstance(out, torch.Tensor) and out.is_floating_point()):
                return
            env[n] = out
            yield n, out


def _ancestors_within(n: fx.Node, region: set) -> list:
    out, stack = set(), [n]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in region and a not in out:
                out.add(a)
                stack.append(a)
    return [m for m in region if m in out]


# arithmetic a log's input is typically computed with (power spectra, magnitudes, energies)
_TO_LOG = {"Mul", "Add", "Sub", "Div", "Pow", "Sqrt", "Abs", "ReduceSum", "ReduceMean", "Clip", "Relu",
           "MatMul"}


def _pools_energy(module) -> bool:
    """A Linear/Conv layer whose weights are all >= 0 (a mel or band filterbank): it sums
    energies, so its input spans the decades its output does."""
    w = getattr(module, "weight", None)
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and isinstance(w, torch.Tensor) \
        and w.numel() > 0 and bool((w >= 0).all())


def log_inputs(infos) -> set:
    """The values that only feed a Log (|CQT|^2 -> sum -> sqrt -> + eps -> log; a power
    spectrum -> mel filterbank matmul -> log): a linear grid there rounds the quiet values the
    log then blows up (a pitch tracker's front end: 10.6 dB with those grids, 21.7 without; a
    wake-word mel front end whose pre-log power spans 0..1e10: 13.9 dB). They stay float; the
    log's output is quantized. The walk goes up through that arithmetic, moves of data, modules
    run whole in float without weights (onnx2torch's max(eps, x)) and filterbanks (layers with
    weights >= 0), whose outputs stay float; any other layer (a DFT as a conv) keeps its input
    grid, its output stays float and the walk ends there, as it does at a value read elsewhere
    and at anything else."""
    by_node = {i.node: i for i in infos}
    keep = set()
    for info in infos:
        if info.op_type != "Log":
            continue
        stack = [a for a in info.node.all_input_nodes]
        while stack:
            n = stack.pop()
            i = by_node.get(n)
            readers = [u for u in n.users if "rq_const" not in u.meta]  # not counting shape reads
            if n in keep or i is None or len(readers) != 1:
                continue
            moves = i.op_type is None and i.passthrough  # a permute, a reshape
            if i.node.op == "call_module" and i.float_leaf and not any(True for _ in i.module.parameters()):
                keep.add(n)  # a module run whole in float without weights (onnx2torch's Max(eps, x))
                stack.extend(n.all_input_nodes)
                continue
            if i.node.op == "call_module" and not moves:
                if i.op_type is not None:  # a layer: its output stays float
                    keep.add(n)
                    if _pools_energy(i.module):  # a filterbank: its input is a power spectrum too
                        stack.extend(n.all_input_nodes)
                continue
            if moves or i.op_type in _TO_LOG:
                keep.add(n)
                stack.extend(n.all_input_nodes)
    return keep


def fused_nodes(gm: fx.GraphModule, infos, supergroups: list) -> tuple[set, dict]:
    """(nodes whose output is inside a fused group, {output node name: activation}): the hw
    config's supergroups, matched with spelled-out batch norms standing in for
    BatchNormalization, plus the interiors of spelled-out activations."""
    fusable = {g[0] for g in supergroups if len(g) >= 2 and g[1] == "BatchNormalization"}
    runs = spelled_batch_norms(gm, infos, fusable)
    as_op = {n: "Identity" for run in runs.values() for n in run[:-1]}
    as_op.update({run[-1]: "BatchNormalization" for run in runs.values()})
    view = [replace(i, op_type=as_op[i.node]) if i.node in as_op else i for i in infos]
    fused = G.match_supergroups(view, supergroups)
    for layer, run in runs.items():
        if layer in fused:
            fused.update(run[:-1])
    clips = [i.node for i in infos if i.op_type in ("Clip", "HardSigmoid")]
    spelled = find_decomposed_activations(gm, clips)
    spelled.update(find_spelled_norms(gm))
    for interior_of in spelled.values():
        fused.update(interior_of[1])
    fused.update(log_inputs(infos))
    return fused, {out.name: act for out, (act, _) in spelled.items()}

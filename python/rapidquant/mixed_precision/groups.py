"""Quantizer groups (what flips precision together), candidates and BitOps cost."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rapidquant.int32_bias import fit_int32_biases
from rapidquant.qmodules import FunctionalOp, InputQuantizer, QuantizedModule

FLOAT_BITOPS_FACTOR = 1.5 ** 0.5  # a float bitwidth costs about 1.22x the same integer width (AIMET)
MAC_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)


@dataclass(frozen=True, order=True)
class Candidate:
    """((act_bw, act_dtype), (param_bw, param_dtype)), e.g. W8A16 = Candidate(16, "int", 8, "int")."""
    act_bw: int
    act_dtype: str
    param_bw: int
    param_dtype: str

    @property
    def name(self) -> str:
        def part(bw, dt):
            return f"{'fp' if dt == 'float' else ''}{bw}"
        if self.act_dtype == self.param_dtype == "float" and self.act_bw == self.param_bw:
            return f"FP{self.act_bw}"
        return f"W{part(self.param_bw, self.param_dtype)}A{part(self.act_bw, self.act_dtype)}"

    def as_tuple(self):
        return ((self.act_bw, self.act_dtype), (self.param_bw, self.param_dtype))

    def cost_bits(self) -> tuple[float, float]:
        a = self.act_bw * (FLOAT_BITOPS_FACTOR if self.act_dtype == "float" else 1)
        p = self.param_bw * (FLOAT_BITOPS_FACTOR if self.param_dtype == "float" else 1)
        return a, p


def parse_candidate(c) -> Candidate:
    """Accept Candidate, ((abw, adt), (pbw, pdt)) or names like "W8A16" / "FP16"."""
    if isinstance(c, Candidate):
        return c
    if isinstance(c, str):
        s = c.upper()
        if s.startswith("FP"):
            bw = int(s[2:])
            return Candidate(bw, "float", bw, "float")
        if s.startswith("W") and "A" in s:
            w, a = s[1:].split("A")
            wd, ad = ("float" if w.startswith("FP") else "int"), ("float" if a.startswith("FP") else "int")
            return Candidate(int(a.replace("FP", "")), ad, int(w.replace("FP", "")), wd)
        raise ValueError(f"cannot parse candidate {c!r}; use e.g. 'W8A8', 'W8A16', 'FP16' or ((16,'int'),(8,'int'))")
    try:
        (abw, adt), (pbw, pdt) = c
    except (TypeError, ValueError):
        raise ValueError(f"a candidate is ((act_bw, dtype), (param_bw, dtype)); got {c!r}") from None
    for dt in (adt, pdt):
        if dt not in ("int", "float"):
            raise ValueError(f"candidate dtype must be 'int' or 'float' (got {dt!r} in {c!r})")
    return Candidate(int(abw), adt, int(pbw), pdt)


@dataclass
class QuantizerGroup:
    """Activation quantizers feeding a set of MAC layers, plus those layers' parameter
    quantizers: they change precision together."""
    name: str
    act_quantizers: list = field(default_factory=list)    # quantizer names
    param_quantizers: list = field(default_factory=list)
    layers: list = field(default_factory=list)             # module names of MAC layers
    macs: int = 0


def upstream_quantizers(gm, node, qmods) -> list[str]:
    """Names of the nearest enabled output quantizers feeding node (through passthrough ops)."""
    out, stack, seen = [], list(node.all_input_nodes), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        m = qmods.get(n.target) if n.op == "call_module" else None
        q = getattr(m, "output_quantizer", None) if m is not None else None
        if q is not None and q.enabled:
            out.append(q.name)
        elif n.op != "placeholder":
            stack.extend(n.all_input_nodes)
    return out


def count_macs(sim, dummy_input) -> dict[str, int]:
    """MACs of every Conv/Linear per forward of dummy_input, by module name."""
    from rapidquant.batches import call_model
    macs, hooks = {}, []
    for name, m in sim.model.named_modules():
        if isinstance(m, QuantizedModule) and isinstance(m.module, MAC_TYPES):
            def hook(mod, inp, out, name=name):
                layer = mod.module
                o = out[0] if isinstance(out, tuple) else out
                if isinstance(layer, nn.Linear):
                    macs[name] = macs.get(name, 0) + o.numel() * layer.in_features
                else:
                    k = layer.weight[0].numel() if not isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d)) \
                        else layer.weight.shape[0] // layer.groups * layer.weight[0, 0].numel()
                    macs[name] = macs.get(name, 0) + o.numel() * k
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), sim.disabled():
            call_model(sim.model, dummy_input, sim.n_inputs)
    finally:
        for h in hooks:
            h.remove()
    return macs


def find_groups(sim, dummy_input=None) -> list[QuantizerGroup]:
    """Group each MAC layer's weights with the activation quantizers feeding it (merging
    layers that share an input); remaining activation quantizers form their own groups."""
    gm = sim.model
    qmods = {n: m for n, m in gm.named_modules() if isinstance(m, (QuantizedModule, FunctionalOp, InputQuantizer))}
    parent: dict[str, str] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a, b):
        parent[find(a)] = find(b)

    layer_acts = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = qmods.get(node.target)
        if isinstance(m, QuantizedModule) and isinstance(m.module, MAC_TYPES) and m.param_quantizers:
            key = "L:" + node.target
            find(key)
            acts = upstream_quantizers(gm, node, qmods)
            layer_acts[node.target] = acts
            for a in acts:
                union("A:" + a, key)
    for name, q in sim.activation_quantizers().items():
        if q.enabled:
            find("A:" + name)
    macs = count_macs(sim, dummy_input) if dummy_input is not None else {}
    twins = {}  # recurrent twins (rapidquant.recurrent): one group per layer-direction
    for m in gm.modules():
        for tname, spec in (m.quantizer_groups().items() if hasattr(m, "quantizer_groups") else ()):
            twins[tname] = spec
            find("T:" + tname)
            for a in spec["acts"]:
                union("A:" + a, "T:" + tname)
    groups: dict[str, QuantizerGroup] = {}
    for key in list(parent):
        root = find(key)
        g = groups.setdefault(root, QuantizerGroup(name=""))
        kind, name = key.split(":", 1)
        if kind == "A":
            g.act_quantizers.append(name)
        elif kind == "T":
            g.layers.append(name)
            g.param_quantizers += twins[name]["params"]
            g.macs += twins[name]["macs"]
        else:
            g.layers.append(name)
            g.param_quantizers += [q.name for q in qmods[name].param_quantizers.values() if q.enabled]
            g.macs += macs.get(name, 0)
    out = []
    for g in groups.values():
        g.name = ",".join(g.layers) if g.layers else ",".join(g.act_quantizers)
        out.append(g)
    order = {q: i for i, q in enumerate(sim.quantizers())}
    out.sort(key=lambda g: min(order.get(q, 0) for q in g.act_quantizers + g.param_quantizers))
    return out


def bitops(groups: list[QuantizerGroup], assignment: dict[str, Candidate]) -> float:
    """Sum over MAC layers of MACs x activation bits x weight bits."""
    total = 0.0
    for g in groups:
        c = assignment.get(g.name)
        if c is None or not g.macs:
            continue
        a, p = c.cost_bits()
        total += g.macs * a * p
    return total


def snapshot(sim) -> dict:
    """Each quantizer's state (Quantizer.state()), to restore exactly later."""
    return {n: q.state() for n, q in sim.quantizers().items()}


def restore(sim, snap: dict) -> None:
    for n, q in sim.quantizers().items():
        q.restore(snap[n])
    fit_int32_biases(sim)


def set_quantizer(q, enabled, dt, bw, fmt, start=None) -> None:
    """Put q at (dt, bw); reuse the start state's encoding when it is for that precision
    (keeps frozen encodings such as AdaRound's), else derive one from the statistics."""
    q.enabled = enabled
    if not enabled:
        return
    same = start is not None and start.precision() == (dt, bw, fmt)
    if same and start.scale is not None:
        q.set_precision(dt, bw, fmt, encoding=(start.scale, start.zero_point))
        q.frozen = start.frozen
    else:
        q.set_precision(dt, bw, fmt, keep_frozen=same)


def weight_swaps(sim, float_weights: dict | None, snap: dict) -> dict:
    """For parameter quantizers whose start encoding is frozen over weights already rounded
    onto its grid (AdaRound writes them into the model): (parameter, rounded copy, float
    weights). At any other precision the rounded weights would only be re-rounded; the
    float ones are the true model there."""
    if not float_weights:
        return {}
    params = sim.parameters_quantized()
    out = {}
    for n, w in float_weights.items():
        p = params.get(n)
        if p is not None and snap[n].frozen and tuple(p.shape) == tuple(w.shape):
            out[n] = [p, p.detach().clone(), w.detach().to(p.device, p.dtype), False]
    return out


def settle(sim, swaps: dict, snap: dict) -> None:
    """After a configuration is applied: give each swapped parameter the weights its
    quantizer's current precision needs, then widen the weight grids whose layer's int32
    bias would not fit at the new precisions (rapidquant.int32_bias). The first time a
    quantizer reads the float weights its statistics are taken from them (those of the
    rounded weights give a wrong encoding); later precisions derive from them."""
    qs = sim.quantizers()
    with torch.no_grad():
        for n, entry in swaps.items():
            p, rounded, float_w, calibrated = entry
            q = qs[n]
            keep = q.enabled and q.frozen and q.precision() == snap[n].precision()
            want = rounded if keep else float_w
            if not torch.equal(p, want):
                p.copy_(want)
            if not keep and q.enabled and not calibrated:
                q.frozen = False
                q.start_calibration()
                q.observer.update(p)
                q.finish_calibration()
                entry[3] = True
    fit_int32_biases(sim)


def apply_candidate(sim, group: QuantizerGroup, c: Candidate | None, snap: dict | None = None) -> None:
    """Set a group's quantizers to a candidate (None: leave them in float). Encodings come
    from the kept calibration statistics (or the snapshot for the original precision):
    no calibration pass."""
    qs = sim.quantizers()
    widened = getattr(sim, "widened", {})  # grids given more bits to keep their data: never fewer
    for names, bw, dt in ((group.act_quantizers, c.act_bw if c else None, c.act_dtype if c else None),
                          (group.param_quantizers, c.param_bw if c else None, c.param_dtype if c else None)):
        fmt = {16: "fp16", 8: "fp8_e4m3"}.get(bw) if dt == "float" else None
        for n in names:
            start = snap.get(n) if snap else None
            floor = start.precision()[1] if (start is not None and n in widened and dt == "int"
                                             and start.precision()[0] == "int") else 0
            set_quantizer(qs[n], c is not None, dt, max(bw, floor) if bw else bw, fmt, start)

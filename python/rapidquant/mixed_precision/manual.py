"""Manual mixed precision: set a module, a module type or the model inputs/outputs to a
precision; the activations feeding a layer follow the layer (they flip together)."""
from __future__ import annotations

import weakref

from torch import fx

from rapidquant.mixed_precision.groups import set_quantizer, upstream_quantizers
from rapidquant.qmodules import FunctionalOp, InputQuantizer, QuantizedModule

# per sim: the activation precisions set_precision was asked for (conflicts keep the higher)
_REQUESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

PRECISIONS = {"int4": ("int", 4, None), "int8": ("int", 8, None), "int16": ("int", 16, None),
              "fp16": ("float", 16, "fp16"), "bf16": ("float", 16, "bf16"), "fp8": ("float", 8, "fp8_e4m3")}


def _parse(p):
    if p is None:
        return None
    if p not in PRECISIONS:
        raise ValueError(f"precision {p!r}: choose one of {sorted(PRECISIONS)}")
    return PRECISIONS[p]


def _bits(spec):
    dt, bw, _ = spec
    return bw * (1.22 if dt == "float" else 1), bw


def set_precision(sim, target, activation: str | None = None, param: str | None = None) -> list[str]:
    """Set precisions by hand. target: a module name, a module class (every module of that
    type, by its original class), "model_input" or "model_output". activation applies to
    the module's output and to the activation quantizers feeding it; param to its
    weights. When an activation quantizer is asked for two precisions by different
    requests, the higher one wins and the change is reported. Returns a log of changes.
    Encodings are derived from the kept calibration statistics.
    """
    a, p = _parse(activation), _parse(param)
    gm: fx.GraphModule = sim.model
    mods = dict(gm.named_modules())
    qmods = {n: m for n, m in mods.items() if isinstance(m, (QuantizedModule, FunctionalOp, InputQuantizer))}
    names = []
    if target == "model_input":
        names = [n for n, m in qmods.items() if isinstance(m, InputQuantizer)]
        if p is not None:
            raise ValueError("model inputs have no parameters")
    elif target == "model_output":
        outs = [a_ for n in gm.graph.nodes if n.op == "output" for a_ in n.all_input_nodes]
        names = [n.target for n in outs if n.op == "call_module" and n.target in qmods]
    elif isinstance(target, type):
        names = [n for n, m in qmods.items() if isinstance(m, QuantizedModule) and isinstance(m.module, target)]
    elif isinstance(target, str):
        if target not in qmods:
            raise KeyError(f"no quantized module named {target!r}")
        names = [target]
    else:
        raise TypeError("target must be a module name, a module class, 'model_input' or 'model_output'")
    if not names:
        raise ValueError(f"nothing in the sim matches {target!r}")
    qs = sim.quantizers()
    log = []
    requested = _REQUESTS.setdefault(sim, {})
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for name in names:
        m = qmods[name]
        if a is not None:
            targets = []
            if m.output_quantizer is not None:
                targets.append(m.output_quantizer.name)
            if isinstance(m, QuantizedModule) and m.param_quantizers and name in nodes:
                targets += upstream_quantizers(gm, nodes[name], qmods)
            for qn in targets:
                spec = a
                prev = requested.get(qn)
                if prev is not None and prev != a:
                    spec = max(prev, a, key=_bits)
                    log.append(f"conflict on {qn}: {prev} vs {a}; kept the higher {spec}")
                requested[qn] = spec
                set_quantizer(qs[qn], True, *spec)
                log.append(f"{qn} -> {spec[0]}{spec[1]}")
        if p is not None:
            if not isinstance(m, QuantizedModule) or not m.param_quantizers:
                raise ValueError(f"{name} has no quantized parameters")
            for q in m.param_quantizers.values():
                set_quantizer(q, True, *p)
                log.append(f"{q.name} -> {p[0]}{p[1]}")
    return log


def copy_precisions(src, dst) -> None:
    """Put every quantizer of sim ``dst`` at the precision and on/off state of the same-named
    quantizer of sim ``src`` (a mixed configuration AMP or set_precision made), so a technique
    that builds its own sim of the same model learns on that configuration. Both sims must
    come from the same model and sim config."""
    theirs, ours = src.quantizers(), dst.quantizers()
    missing = [n for n in ours if n not in theirs]
    if missing:
        raise ValueError(f"precisions_from: that sim has no quantizers named {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; build it on the same model with the same "
                         "QuantSimConfig (exclusions, capture) as this technique's sim_config")
    for name, q in ours.items():
        set_quantizer(q, theirs[name].enabled, *theirs[name].precision())

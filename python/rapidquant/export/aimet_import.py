"""Encodings files written by AIMET, placed onto a sim's quantizers.

AIMET keys its files by the tensor names of its own ONNX export: ``/block/relu/Relu_output_0``,
``t.1`` and ``40`` in 1.0.0 files (torch.onnx's TorchScript exporter), ``relu`` and
``linear`` in 2.0.0 files (the dynamo exporter), parameter names for weights, and module
names in the ``*_torch.encodings`` file. A tensor is placed through the ONNX model AIMET wrote
beside the file (``net.onnx`` next to ``net.encodings``): a graph input is the sim's input of
that position, an initializer the parameter of that name, anything else the output of the
node that produces it, whose module scope comes from the node's metadata (dynamo) or its
name (AIMET names module nodes after the module; TorchScript scopes read ``/block/Add``).
Without the ONNX model, TorchScript-style tensor names are parsed the same way.

A node inside a leaf module is that module's output quantizer; a functional op is matched to
the sim's functional op of the same type in the same module scope, in graph order.
Records AIMET derives rather than calibrates (constants, copies of an encoding onto a
data-movement output) need no quantizer of their own and are counted as such.
"""
from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass, field

_INT_DTYPES = {"int4": (4, True), "uint4": (4, False), "int8": (8, True), "uint8": (8, False),
               "int16": (16, True), "uint16": (16, False), "int32": (32, True), "uint32": (32, False)}
_FLOAT_DTYPES = {"float16": ("fp16", 16), "bfloat16": ("bf16", 16), "float8e4m3fn": ("fp8_e4m3", 8),
                 "float8e5m2": ("fp8_e5m2", 8)}


@dataclass(frozen=True)
class Encoding:
    """One record in rapidquant's terms (ONNX convention: q = round(x / scale) + zero_point)."""
    dtype: str                      # "int" | "float"
    bitwidth: int
    scale: tuple = ()
    zero_point: tuple = ()
    signed: bool = True
    symmetric: bool = True
    axis: int | None = None
    block_size: int | None = None
    float_format: str | None = None


@dataclass
class LoadReport:
    """What loading an encodings file did."""
    placed: dict = field(default_factory=dict)     # record name -> quantizer names
    derived: list = field(default_factory=list)    # records AIMET derives (constants, copies): nothing to place
    unplaced: list = field(default_factory=list)   # records no quantizer of this sim matches
    disabled: list = field(default_factory=list)   # quantizers the file does not list (not quantized there)


# ------------------------------------------------------------------ records
def _aimet_int(bw: int, sym: bool, scales, offsets, axis=None, block_size=None) -> Encoding:
    """AIMET offsets: symmetric signed grids store -2^(bw-1); others the negated zero point."""
    signed = sym and all(int(o) == -(2 ** (bw - 1)) for o in offsets)
    zps = tuple(0 for _ in offsets) if signed else tuple(-int(o) for o in offsets)
    return Encoding("int", bw, tuple(float(s) for s in scales), zps, signed, sym, axis, block_size)


def _v1(r: dict) -> Encoding:
    if r["dtype"].upper() == "FLOAT":
        return Encoding("float", int(r["bw"]), float_format={16: "fp16"}.get(int(r["bw"]), "fp16"))
    kind = r.get("enc_type", "PER_TENSOR")
    axis = 0 if kind in ("PER_CHANNEL", "PER_BLOCK") else None
    return _aimet_int(int(r["bw"]), bool(r["is_sym"]), r["scale"], r["offset"], axis,
                      r.get("block_size") if kind == "PER_BLOCK" else None)


def _v061(encs) -> Encoding:
    encs = encs if isinstance(encs, list) else [encs]
    e = encs[0]
    if str(e.get("dtype", "int")).lower() == "float":
        return Encoding("float", int(e["bitwidth"]), float_format="fp16" if int(e["bitwidth"]) == 16 else None)
    sym = str(e.get("is_symmetric", "False")) == "True"
    return _aimet_int(int(e["bitwidth"]), sym, [x["scale"] for x in encs], [x["offset"] for x in encs],
                      0 if len(encs) > 1 else None)


def _v2(r: dict) -> Encoding:
    dt = r["output_dtype"]
    scales = r.get("y_scale")
    flat = lambda v: tuple(v) if isinstance(v, list) else ((v,) if v is not None else ())  # noqa: E731
    if dt in _FLOAT_DTYPES:
        fmt, bw = _FLOAT_DTYPES[dt]
        return Encoding("float", bw, flat(scales), float_format=fmt)
    if dt not in _INT_DTYPES:
        raise ValueError(f"encoding '{r['name']}': output_dtype {dt!r} is not one rapidquant simulates")
    bw, signed = _INT_DTYPES[dt]
    scales = flat(scales)
    zps = flat(r.get("y_zero_point", 0))
    if len(zps) == 1 and len(scales) > 1:
        zps = zps * len(scales)
    symmetric = all(z == (0 if signed else 2 ** (bw - 1)) for z in zps)
    axis = r.get("axis") if len(scales) > 1 else None
    return Encoding("int", bw, scales, tuple(int(z) for z in zps), signed, symmetric, axis, r.get("block_size"))


def records(doc: dict) -> tuple[str, dict]:
    """(kind, {name: Encoding}): kind is "tensor" (ONNX tensor names) or "module" (a
    ``_torch.encodings`` file: ``module:output:0``, ``module:input:0`` and parameter names)."""
    version = str(doc.get("version", ""))
    acts, params = doc.get("activation_encodings"), doc.get("param_encodings")
    if version == "2.0.0" or version.startswith("2."):
        return "tensor", {r["name"]: _v2(r) for r in doc["encodings"] if r["output_dtype"] != "int32"}
    if isinstance(acts, list):  # 1.0.0
        return "tensor", {r["name"]: _v1(r) for r in acts + params if int(r.get("bw", 0)) != 32}
    if isinstance(acts, dict):  # 0.6.1 tensor-keyed, or the module-keyed _torch.encodings
        if any(isinstance(v, dict) and ("output" in v or "input" in v) for v in acts.values()):
            out = {}
            for module, sides in acts.items():
                for side, encs in sides.items():
                    for idx, e in encs.items():
                        out[f"{module}:{side}:{idx}"] = _v061(e)
            out.update({p: _v061(e) for p, e in (params or {}).items()})
            return "module", out
        out = {t: _v061(e) for t, e in acts.items()}
        out.update({p: _v061(e) for p, e in (params or {}).items()})
        return "tensor", out
    raise ValueError("unrecognised encodings file: expected rapidquant's format or AIMET's 0.6.1, 1.0.0 "
                     "or 2.0.0 schema (keys 'quantizers', 'activation_encodings' or 'encodings')")


# ------------------------------------------------------------------ the sim's side
@dataclass
class SimIndex:
    """Where the sim's quantizers sit, in the terms AIMET's names use."""
    outputs: dict       # module path -> its output quantizer name
    params: dict        # parameter name -> quantizer name
    inputs: list        # model input position -> input quantizer name
    functional: dict    # module scope -> [(op type, quantizer name)] in graph order
    modules: set        # every module path of the user's model
    feeds: dict         # module path -> [quantizer names of its inputs]


def index_sim(sim) -> SimIndex:
    from rapidquant.qmodules import FunctionalOp, InputQuantizer, QuantizedModule
    gm = sim.model
    mods = dict(gm.named_modules())
    outputs, functional, inputs, feeds = {}, {}, [], {}
    params = {q.name: q.name for q in sim.param_quantizers().values()}
    producer = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = mods[node.target]
        q = getattr(m, "output_quantizer", None)
        if isinstance(m, InputQuantizer):
            inputs.append(q.name)
        elif isinstance(m, FunctionalOp) and q is not None:
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            scope = stack[-1][0] if stack else ""
            functional.setdefault(scope, []).append((m.op_type, q.name))
        elif q is not None:
            outputs[node.target] = q.name
        if q is not None:
            producer[node] = q.name
        if isinstance(m, QuantizedModule) or not isinstance(m, (FunctionalOp, InputQuantizer)):
            feeds[node.target] = [producer.get(a) for a in node.args if hasattr(a, "op")]
    modules = {n for n, _ in gm.named_modules()} | set(outputs)
    return SimIndex(outputs, params, inputs, functional, modules, feeds)


# ------------------------------------------------------------------ placement
_TS_OP = re.compile(r"^([A-Za-z]+)(?:_(\d+))?$")


def _ts_scope(parts: list[str]) -> str:
    """Module path from TorchScript scope parts: ['layer1', 'layer1.0', 'conv1'] -> 'layer1.0.conv1'."""
    path = ""
    for p in parts:
        path = p if (not path or p.startswith(path + ".")) else f"{path}.{p}"
    return path


def _deepest(scopes: list[str], idx: SimIndex) -> str:
    for s in reversed(scopes):
        if s in idx.modules or s == "":
            return s
    return ""


class _Placer:
    def __init__(self, idx: SimIndex, onnx_model=None):
        self.idx = idx
        self.used: dict = {}  # (scope, op type) -> functional ops taken so far
        self.graph_inputs, self.initializers, self.producer = [], set(), {}
        if onnx_model is not None:
            g = onnx_model.graph
            self.initializers = {t.name for t in g.initializer}
            self.graph_inputs = [i.name for i in g.input if i.name not in self.initializers]
            for n in g.node:
                for o in n.output:
                    self.producer[o] = n

    def place(self, name: str) -> list[str] | str:
        """Quantizer names for a tensor, or a reason it has none ('derived' / 'unplaced')."""
        idx = self.idx
        if name in idx.params:
            return [idx.params[name]]
        if name in self.graph_inputs:
            k = self.graph_inputs.index(name)
            return [idx.inputs[k]] if k < len(idx.inputs) else "unplaced"
        if name in self.initializers:
            return "derived"  # a constant AIMET gave an encoding (a scalar multiplier)
        node = self.producer.get(name)
        if node is not None:
            if node.op_type == "Constant":
                return "derived"
            return self._node(node)
        if name.startswith("/"):  # no ONNX model: a TorchScript tensor name spells its scope
            parts = name.split("/")[1:]
            return self._scoped(parts[:-1], parts[-1].split("_output_")[0])
        if name in idx.outputs:  # a module path
            return [idx.outputs[name]]
        return "unplaced"

    def _node(self, node):
        md = {p.key: p.value for p in node.metadata_props}
        scopes = md.get("pkg.torch.onnx.name_scopes")
        if scopes:  # dynamo export: ['', 'block', 'block.bn', '<aten op>']
            scopes = list(ast.literal_eval(scopes))[:-1]
            deepest = _deepest(scopes, self.idx)
            if deepest in self.idx.outputs:
                return [self.idx.outputs[deepest]]
            if deepest and deepest == scopes[-1] and deepest in self.idx.modules:
                return "derived"  # inside a module the sim leaves unquantized (a fused conv)
            return self._functional(deepest, node.op_type)
        if node.name in self.idx.outputs:  # AIMET names module nodes after their module
            return [self.idx.outputs[node.name]]
        if node.name in self.idx.modules:
            return "derived"
        if node.name.startswith("/"):
            parts = node.name.split("/")[1:]
            return self._scoped(parts[:-1], parts[-1])
        return "unplaced"

    def _scoped(self, parts: list[str], last: str):
        path = _ts_scope(parts)
        if path in self.idx.outputs:
            return [self.idx.outputs[path]]
        m = _TS_OP.match(last)
        if not m:
            return "unplaced"
        if m.group(1) == "Constant":
            return "derived"
        return self._functional(_deepest([_ts_scope(parts[:i]) for i in range(len(parts) + 1)], self.idx), m.group(1))

    def _functional(self, scope: str, op_type: str):
        ops = [q for t, q in self.idx.functional.get(scope, []) if t == op_type]
        k = self.used.get((scope, op_type), 0)
        if k >= len(ops):
            return "unplaced"
        self.used[(scope, op_type)] = k + 1
        return [ops[k]]


def place_modules(names, idx: SimIndex) -> dict:
    """Placement for a module-keyed file: ``module:output:0``, ``module:input:0``, parameters."""
    out = {}
    for name in names:
        if ":" not in name:
            out[name] = [idx.params[name]] if name in idx.params else "unplaced"
            continue
        module, side, i = name.split(":")
        if side == "output" and i == "0" and module in idx.outputs:
            out[name] = [idx.outputs[module]]
        elif side == "input":
            feeds = idx.feeds.get(module, [])
            q = feeds[int(i)] if int(i) < len(feeds) else None
            out[name] = [q] if q is not None else "unplaced"
        else:
            out[name] = "unplaced"
    return out


def sibling_onnx(path: str) -> str | None:
    """The ONNX model AIMET wrote beside an encodings file (net.encodings -> net.onnx)."""
    base = os.path.basename(path)
    for suffix in ("_torch.encodings", ".encodings.json", ".encodings", ".json"):
        if base.endswith(suffix):
            cand = os.path.join(os.path.dirname(path), base[: -len(suffix)] + ".onnx")
            return cand if os.path.exists(cand) else None
    return None


def placements(sim, kind: str, names, onnx_model=None) -> dict:
    """{record name: [quantizer names] | 'derived' | 'unplaced'} for an AIMET file."""
    idx = index_sim(sim)
    if kind == "module":
        return place_modules(names, idx)
    placer = _Placer(idx, onnx_model)
    return {n: placer.place(n) for n in names}

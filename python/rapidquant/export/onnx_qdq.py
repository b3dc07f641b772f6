"""Export a QuantSim to an ONNX model with QuantizeLinear/DequantizeLinear nodes.

torch.onnx (dynamo) exports sim.model while quantizers call the *named* QDQ ops
(:mod:`rapidquant.ops.named`): each traced op carries its quantizer's name, and the
translation below stamps that name on the QuantizeLinear/DequantizeLinear it emits
(node metadata ``rapidquant.quantizer``). The encodings map (quantizer -> the tensor its
QuantizeLinear quantizes) is read off those stamps: mapped by construction, whatever
torch.onnx folds or fuses around the nodes.

Representation (chosen so onnxruntime's default optimizations load and keep it):
- activations use unsigned containers (uint8/uint16; a signed grid is shifted by 128 or
  32768 with its zero point, which is the same function). onnxruntime 1.2x-1.3x's QDQ
  propagation through Reshape/Transpose combined with its int8->uint8 activation rewrite
  produces a QuantizeLinear whose ``output_dtype`` is INT8 with a UINT8 zero point, and
  the default session refuses the model ("[TypeInferenceError] output_dtype INT8 does not
  match y_zero_point type UINT8"). uint8 activations are what that rewrite produces
  anyway, so nothing is left for it to do. Weights keep the grid's signedness, except the
  int8 weights of Conv/MatMul/Gemm with uint8 inputs, which go into uint8 (zero point + 128;
  ort_guards.unsigned_weight_containers; ``unsigned_weights=False`` keeps int8).
- a grid narrower than its container (2..7 and 9..15 bits) is clamped in the integer
  domain between Q and DQ (``Clip`` on the uint8/int8 codes) for 8-bit containers: Q still
  quantizes the original tensor (a weight's Q input is the weight initializer itself) and
  DQ still feeds the consuming op, so onnxruntime's QDQ fusions see their usual pattern.
  onnxruntime has no int16/uint16 Clip, so 16-bit containers clamp after DQ, in float,
  at exactly the values DQ gives the grid ends. int4 containers are not used: onnxruntime's
  Relu/Clip-before-Q fusions mishandle int4 activations.
Float quantizers become casts (fp16/bf16) or float8 QDQ.

Afterwards int32 bias encodings are added, and the model is run in onnxruntime against the
sim with default session options and with ORT_DISABLE_ALL (the parity figures).
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from rapidquant.export.encodings import aimet_doc, rapidquant_doc, check_writable, write_json, FORMATS
from rapidquant import recurrent as R
from rapidquant.batches import unmarked
from rapidquant.capture import without_graph_dumps
from rapidquant.export.leaves import recorded_float_leaves
from rapidquant.export.registry_cache import cached_torchlib_registry
from rapidquant.export.onnx_graph import producers
from rapidquant.scoring import sqnr_db
from rapidquant.export.ort_guards import unsigned_weight_containers, widen_weight_only_matmul_containers
from rapidquant.ops import named
from rapidquant.ops.float_qdq import FORMAT_MAX

OPSET = 21
TAG = "rapidquant.quantizer"  # node metadata: the quantizer a node belongs to
ROLE = "rapidquant.role"      # quantize / clamp / dequantize
LEVELS = ("default", "disable_all")  # onnxruntime graph optimization levels the check runs
PARITY_WARN_STEPS = 2.0  # largest |sim - onnxruntime| (in output steps) the check accepts quietly
# file and sim equally good: their output SQNRs against the float model (on the dummy input)
# within QUALITY_TOL_DB, both counted as at most a ceiling 8 dB under the ideal SQNR of the
# output grid (6.02 dB per bit: 40 dB for 8-bit outputs, 88 dB for 16-bit ones), where single
# steps of that grid are all that differs. Deep nets resolve some rounding ties the other way
# in onnxruntime's kernels and carry the flip on: outputs then differ by a few steps while the
# quality is the sim's.
QUALITY_TOL_DB = 1.0


def quality_ceiling_db(output_bits: int | None) -> float:
    """The SQNR above which file and sim count as equal (float outputs: no ceiling)."""
    return float("inf") if output_bits is None else 6.02 * output_bits - 8.0


@dataclass
class Parity:
    """sim vs onnxruntime on the dummy input at one optimization level."""
    max_abs_diff: float
    max_steps: float | None      # largest difference in output quantization steps (None: float output)
    frac_differing: float        # fraction of output elements that are not bit-equal
    elements: int
    file_sqnr_db: float | None = None  # the file's output against the float model (dummy input)
    sim_sqnr_db: float | None = None   # the sim's
    output_bits: int | None = None     # the narrowest output grid (None: a float output)

    def same_quality(self) -> bool | None:
        """Whether file and sim are equally close to the float model (None: not measured)."""
        if self.file_sqnr_db is None or self.sim_sqnr_db is None:
            return None
        cap = quality_ceiling_db(self.output_bits)
        return abs(min(self.file_sqnr_db, cap) - min(self.sim_sqnr_db, cap)) <= QUALITY_TOL_DB

    def file_better(self) -> bool:
        """The file is measurably closer to the float model than the sim (dummy input)."""
        if self.same_quality() is not False:
            return False
        cap = quality_ceiling_db(self.output_bits)
        return min(self.file_sqnr_db, cap) > min(self.sim_sqnr_db, cap)


@dataclass
class ExportResult:
    onnx: str
    encodings: str
    qdq_pairs: int = 0
    tensor_names: dict = field(default_factory=dict)   # quantizer -> tensor its QuantizeLinear quantizes
    q_nodes: dict = field(default_factory=dict)        # quantizer -> all tensors (a quantizer called twice)
    unmapped: list = field(default_factory=list)       # enabled quantizers with no node in the graph
    folded: list = field(default_factory=list)         # fp16/bf16 weight quantizers folded into the weight
    merged: dict = field(default_factory=dict)         # weight quantizer -> the twin whose Q node it shares
    parity: dict = field(default_factory=dict)         # level -> Parity
    ort_errors: dict = field(default_factory=dict)     # level -> why the session failed
    ort_max_abs_diff: float | None = None  # |sim - onnxruntime| on the dummy input, default options
    ort_ok: bool | None = None             # runs in a default onnxruntime session


def _container(qmin: int, qmax: int, unsigned: bool):
    """(ONNX type, type min, type max, offset): codes are q + offset."""
    from onnx import TensorProto as T
    if qmax - qmin > 65535:
        raise ValueError(f"[{qmin}, {qmax}] does not fit an ONNX QuantizeLinear type (at most 16 bits)")
    if unsigned and qmin < 0:  # shift a signed grid into the unsigned container (see module doc)
        off = 128 if (qmin >= -128 and qmax <= 127) else 32768
        t = T.UINT8 if off == 128 else T.UINT16
        return t, 0, 2 * off - 1, off
    for lo, hi, t in ((-128, 127, T.INT8), (0, 255, T.UINT8), (-32768, 32767, T.INT16), (0, 65535, T.UINT16)):
        if lo <= qmin and qmax <= hi and (lo < 0) == (qmin < 0):
            return t, lo, hi, 0
    raise ValueError(f"[{qmin}, {qmax}] does not fit an ONNX QuantizeLinear type (at most 16 bits)")


def _tag(value, name: str, role: str):
    node = value.producer()
    if node is not None:
        node.metadata_props[TAG] = name
        node.metadata_props[ROLE] = role
    return value


def _translation_table(params: set, seen: list):
    """Translations of the named QDQ ops. ``params``: names of parameter quantizers (their
    containers keep the grid's sign); ``seen`` collects every name translated."""
    from onnx import TensorProto as T
    from onnxscript import opset21 as op

    def qdq(x, scale, zero_point, qmin: int, qmax: int, block, name: str = ""):
        seen.append(name)
        if getattr(x, "dtype", None) not in (None, T.FLOAT):  # onnx_ir's DataType is TensorProto's number
            # an fp16/bf16 tensor: the sim quantizes it in fp32 with fp32 scales (ONNX's Q needs
            # x and scale of one type, and an fp16 scale would move the grid), then casts back
            return op.CastLike(qdq(op.Cast(x, to=T.FLOAT), scale, zero_point, qmin, qmax, block, name), x)
        block = list(block)
        rank = len(block)
        t, lo, hi, off = _container(qmin, qmax, unsigned=name not in params)
        nz = [d for d, b in enumerate(block) if b != 0]
        blocked = [d for d, b in enumerate(block) if b > 1]
        attrs = {}
        if not nz:  # per tensor: scalar scale and zero point
            s = op.ReduceMax(scale, keepdims=0)
            z = op.ReduceMax(zero_point, keepdims=0)
        elif not blocked and len(nz) == 1:
            s = op.Reshape(scale, op.Constant(value_ints=[-1]))
            z = op.Reshape(zero_point, op.Constant(value_ints=[-1]))
            attrs["axis"] = nz[0]
        elif len(blocked) == 1:
            # ONNX blocked quantization: every other dim per index; expand broadcast dims
            ax = blocked[0]
            shape_x = op.Shape(x)
            reps = []
            for d in range(rank):
                reps.append(op.Constant(value_ints=[1]) if block[d] != 0 else
                            op.Slice(shape_x, op.Constant(value_ints=[d]), op.Constant(value_ints=[d + 1])))
            rep = op.Concat(*reps, axis=0)
            s, z = op.Tile(scale, rep), op.Tile(zero_point, rep)
            attrs["axis"], attrs["block_size"] = ax, block[ax]
        else:
            raise ValueError(f"cannot express block layout {block} as ONNX blocked quantization")
        if off:
            z = op.Add(z, op.CastLike(off, z))
        zq = op.Cast(z, to=t)
        narrow = (qmin + off, qmax + off) != (lo, hi)
        float_clamp = narrow and t not in (T.INT8, T.UINT8)  # no 16-bit integer Clip in onnxruntime
        if float_clamp and name not in params and not blocked:
            # activation: clamp in front of Q at the grid ends (torch.onnx may fuse a Relu into
            # this Clip; the Q then quantizes the clamped tensor, the same values)
            x = _tag(_clamp(op, x, scale, zero_point, qmin, qmax, nz, rank), name, "clamp")
        q = _tag(op.QuantizeLinear(x, s, zq, **attrs), name, "quantize")
        if narrow and t in (T.INT8, T.UINT8):  # integer clamp onto the grid (see module doc)
            q = _tag(op.Clip(q, op.Cast(op.Constant(value_int=qmin + off), to=t),
                             op.Cast(op.Constant(value_int=qmax + off), to=t)), name, "clamp")
        y = _tag(op.DequantizeLinear(q, s, zq, **attrs), name, "dequantize")
        if float_clamp and blocked:  # the grid ends as DQ computes them, element by element
            ends = [op.DequantizeLinear(op.ConstantOfShape(op.Shape(x), value=_scalar_tensor(v + off, t)),
                                        s, zq, **attrs) for v in (qmin, qmax)]
            y = _tag(op.Min(op.Max(y, ends[0]), ends[1]), name, "clamp")
        elif float_clamp and name in params:  # weight: clamp after DQ, so Q reads the weight initializer
            y = _tag(_clamp(op, y, scale, zero_point, qmin, qmax, nz, rank), name, "clamp")
        return y

    def float_qdq(x, scale, fmt: int, block, name: str = ""):
        seen.append(name)
        if fmt not in (0, 1) and getattr(x, "dtype", None) not in (None, T.FLOAT):
            # fp8 of an fp16 tensor: Q takes x and its (fp32) scale in one type, as in qdq
            return op.CastLike(float_qdq(op.Cast(x, to=T.FLOAT), scale, fmt, block, name), x)
        if fmt in (0, 1):  # fp16 / bf16: saturate, cast, cast back
            m = op.CastLike(FORMAT_MAX[fmt], x)
            v = x if scale is None else op.Div(x, op.CastLike(scale, x))
            v = op.Min(op.Max(v, op.Neg(m)), m)
            v = _tag(op.Cast(v, to=T.FLOAT16 if fmt == 0 else T.BFLOAT16), name, "quantize")
            v = _tag(op.CastLike(v, x), name, "dequantize")
            return v if scale is None else op.Mul(v, op.CastLike(scale, x))
        t = T.FLOAT8E4M3FN if fmt == 2 else T.FLOAT8E5M2
        s = op.Constant(value_float=1.0) if scale is None else scale
        nz = [d for d, b in enumerate(block) if b != 0]
        attrs = {}
        if scale is not None and nz:
            s = op.Reshape(s, op.Constant(value_ints=[-1]))
            attrs["axis"] = nz[0]
        elif scale is not None:
            s = op.ReduceMax(s, keepdims=0)
        # no zero point (the type comes from output_dtype): with a float8 zero point input,
        # onnxruntime's ReluQuantRewrite (default options) takes the Q to be unsigned and
        # deletes a Relu in front of it, though float8 holds negatives (measured: 52 output
        # steps on a small ConvNet)
        q = _tag(op.QuantizeLinear(x, s, saturate=1, output_dtype=t, **attrs), name, "quantize")
        return _tag(op.DequantizeLinear(q, s, **attrs), name, "dequantize")

    def unnamed_qdq(x, scale, zero_point, qmin: int, qmax: int, block):
        return qdq(x, scale, zero_point, qmin, qmax, block)

    def unnamed_float_qdq(x, scale, fmt: int, block):
        return float_qdq(x, scale, fmt, block)

    r = torch.ops.rapidquant
    return {r.named_quantize_dequantize.default: qdq, r.named_float_quantize_dequantize.default: float_qdq,
            # a model that calls rapidquant.ops itself: exported, but belongs to no quantizer
            r.quantize_dequantize.default: unnamed_qdq, r.float_quantize_dequantize.default: unnamed_float_qdq}


def _clamp(op, x, scale, zero_point, qmin: int, qmax: int, nz: list, rank: int):
    """x clamped to [(qmin - zp) * scale, (qmax - zp) * scale]: exactly the values DQ gives the
    grid ends. Per tensor a Clip with scalar bounds (torch.onnx would rewrite Min/Max into one
    anyway); per channel Min/Max with the ends shaped to broadcast along the channel axis of
    x's ``rank`` dims (the named op takes the quantizer's one-dim parameters)."""
    ends = [op.Mul(op.Sub(op.CastLike(v, scale), zero_point), scale) for v in (qmin, qmax)]
    if not nz:
        return op.Clip(x, *[op.ReduceMax(e, keepdims=0) for e in ends])
    shape = op.Constant(value_ints=[-1 if d == nz[0] else 1 for d in range(rank)])
    lo, hi = (op.Reshape(e, shape) for e in ends)
    return op.Min(op.Max(x, lo), hi)


def _scalar_tensor(v: int, t):
    from onnx import helper
    return helper.make_tensor("value", t, [1], [int(v)])


def _meta(node) -> dict:
    return {p.key: p.value for p in node.metadata_props}


def quantizer_nodes(model_proto) -> dict:
    """quantizer name -> list of (QuantizeLinear or fp16/bf16 Cast) nodes stamped with it,
    in the main graph and in loop bodies (an LSTM's cell quantizers run inside its Scan)."""
    import onnx
    out: dict = {}
    graphs = [model_proto.graph]
    while graphs:
        for node in graphs.pop().node:
            md = _meta(node)
            if md.get(ROLE) == "quantize" and md.get(TAG):
                out.setdefault(md[TAG], []).append(node)
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    return out


def _map_quantizers(model_proto, sim, seen: list):
    """(first tensor, all tensors, unmapped, folded, merged): every enabled quantizer the forward pass
    called must own at least one stamped quantize node."""
    nodes = quantizer_nodes(model_proto)
    first = {n: ns[0].input[0] for n, ns in nodes.items()}
    every = {n: [x.input[0] for x in ns] for n, ns in nodes.items()}
    params = sim.param_quantizers()
    enabled = [n for n, q in sim.quantizers().items() if q.enabled]
    # an fp16/bf16 weight's saturate-and-cast is constant-folded by torch.onnx into the weight
    # initializer itself (its values are exactly the rounded weights): nothing to map
    folded = [n for n in enabled if n not in nodes and n in params and params[n].dtype == "float"
              and params[n].float_format in ("fp16", "bf16")]
    unmapped = [n for n in enabled if n not in nodes and n not in folded]
    merged = {}
    for n in sorted(set(unmapped) & set(seen)):  # traced, then removed by torch.onnx's optimizer
        twin = _twin(n, nodes, sim)
        if twin is not None:
            merged[n] = twin
            every[n] = list(every[twin])
            first[n] = first[twin]
    unmapped = [n for n in unmapped if n not in merged]
    return first, every, unmapped, folded, merged


def param_of(sim, name: str) -> torch.Tensor:
    """The float parameter a weight quantizer quantizes."""
    from rapidquant.qmodules import QuantizedModule
    for _, m in sim.qmodules():
        if isinstance(m, QuantizedModule):
            for key, q in m.param_quantizers.items():
                if q.name == name:  # keys are parameter names with "." spelled "__"
                    return m.param(key.replace("__", "."))
    raise KeyError(f"no parameter quantized by {name!r}")


def _twin(name: str, nodes: dict, sim):
    """The stamped weight quantizer whose QuantizeLinear took this one's place: torch.onnx
    deduplicates equal initializers (two LayerNorms' all-ones weights) and then merges the
    identical Q nodes reading them. Same values, same encoding: the same Q node."""
    params = sim.param_quantizers()
    if name not in params:
        return None
    q, w = params[name], param_of(sim, name)
    for other in nodes:
        o = params.get(other)
        if o is not None and o.encoding == q.encoding:
            ow = param_of(sim, other)
            if ow.shape == w.shape and torch.equal(ow, w):
                return other
    return None


_SHAPE_ONLY = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def _keeps_values(n) -> bool:
    """A shape-only op, or a Cast between float types (an fp16 model's QDQ runs in fp32 and is
    cast back); not a cast to integers."""
    if n.op_type == "Cast":
        from onnx import TensorProto as T
        return any(a.name == "to" and a.i in (T.FLOAT, T.FLOAT16, T.DOUBLE, T.BFLOAT16) for a in n.attribute)
    return n.op_type in _SHAPE_ONLY


def _quantizer_of(tensor: str, producer: dict, sim):
    """The integer quantizer whose (stamped) DQ or clamp produced ``tensor``, through shape-only ops."""
    n = producer.get(tensor)
    while n is not None and _keeps_values(n):
        n = producer.get(n.input[0])
    if n is None:
        return None
    md = _meta(n)
    if md.get(ROLE) not in ("dequantize", "clamp") or md.get(TAG) not in sim.quantizers():
        return None
    q = sim.quantizer(md[TAG])
    return q if q.dtype == "int" and q.scale is not None else None


def drop_unused_initializers(model_proto) -> None:
    """Remove initializers no node (in any subgraph) reads and no graph output names."""
    import onnx
    used = {v.name for v in list(model_proto.graph.output) + list(model_proto.graph.input)}
    graphs = [model_proto.graph]
    while graphs:
        for node in graphs.pop().node:
            used.update(node.input)
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    keep = [t for t in model_proto.graph.initializer if t.name in used]
    if len(keep) < len(model_proto.graph.initializer):
        del model_proto.graph.initializer[:]
        model_proto.graph.initializer.extend(keep)


def _add_int32_bias(model_proto, sim) -> dict:
    """int32 bias encodings (scale = s_input * s_weight). The biases the sim runs as int32
    (QuantizedModule.bias_grid) go into the graph as int32 initializers behind a
    DequantizeLinear, with the sim's values: onnxruntime then adds exactly those at every
    optimization level (it would quantize a float bias itself from its Conv/Gemm's input
    and weight scales, but only where it sees them). Other Conv/Gemm biases whose input and
    weight are quantized get an encoding only."""
    import onnx
    from onnx import helper, numpy_helper

    from rapidquant.qmodules import INT32_BIAS_LIMIT, QuantizedModule
    g = model_proto.graph
    inits = {i.name: i for i in g.initializer}
    out, new_nodes, saturated = {}, [], []
    for name, m in sim.model.named_modules():
        step = m.bias_grid() if isinstance(m, QuantizedModule) else None
        init = f"{name}.module.bias"
        if step is None or init not in inits:
            continue
        b = m.module.bias.detach().float().cpu()
        step = step.float().cpu()
        if (b / step).abs().max() > INT32_BIAS_LIMIT:
            saturated.append(name)
        q = torch.round(b / step).clamp(-INT32_BIAS_LIMIT, INT32_BIAS_LIMIT).to(torch.int32).numpy()
        sb = step.numpy().astype(np.float32)
        qname, sname, dqname = init + "_int32", init + "_int32_scale", init + "_dq"
        g.initializer.extend([numpy_helper.from_array(q, qname), numpy_helper.from_array(sb, sname)])
        axis = {"axis": 0} if sb.ndim == 1 and sb.size > 1 else {}
        new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname], [dqname],
                                          name=init + "_DequantizeLinear", **axis))
        if inits[init].data_type != onnx.TensorProto.FLOAT:  # an fp16/bf16 layer adds it in its own type
            new_nodes.append(helper.make_node("Cast", [dqname], [dqname + "_cast"], name=init + "_Cast",
                                              to=inits[init].data_type))
            dqname += "_cast"
        for node in g.node:
            for i, t in enumerate(node.input):
                if t == init:
                    node.input[i] = dqname
        out[init] = {"scale": sb.reshape(-1).tolist(), "bitwidth": 32}
    if saturated:
        warnings.warn(f"int32 bias saturates in {', '.join(saturated)}: the bias needs more than 31 bits on the "
                      "grid s_input * s_weight, so the sim and every integer runtime clip it. Calibration widens "
                      "a weight grid until its bias fits, but not a frozen one (loaded or learned): unfreeze that "
                      "weight encoding, or use fewer bits for that layer's input or weight", stacklevel=3)
    producer = producers(g)
    for node in g.node:  # encodings only
        if node.op_type not in ("Conv", "Gemm", "ConvTranspose") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        qx, qw = _quantizer_of(node.input[0], producer, sim), _quantizer_of(node.input[1], producer, sim)
        if qx is None or qw is None or qx.scale.numel() != 1:
            continue
        sb = (qx.scale.detach().float().reshape(()) * qw.scale.detach().float().reshape(-1)).cpu().numpy()
        nb = numpy_helper.to_array(inits[node.input[2]]).size
        if sb.size in (1, nb):
            out[node.input[2]] = {"scale": np.broadcast_to(sb, (nb,)).tolist(), "bitwidth": 32}
    for n in reversed(new_nodes):  # DequantizeLinear nodes must come before their users
        g.node.insert(0, n)
    return out


def output_steps(model_proto, sim) -> list:
    """Per graph output: the scale of the quantizer that produced it (None: not quantized)."""
    return _steps(_output_quantizers(model_proto, sim))


def _output_quantizers(model_proto, sim) -> list:
    producer = producers(model_proto.graph)
    return [_quantizer_of(o.name, producer, sim) for o in model_proto.graph.output]


def _steps(qs: list) -> list:
    return [None if q is None or q.axis is not None or q.block_size is not None
            else float(q.scale.detach().reshape(-1)[0]) for q in qs]


def _narrowest_bits(qs: list) -> int | None:
    """The narrowest integer grid among the outputs' quantizers (None when some output is not on one)."""
    if not qs or any(q is None or q.dtype != "int" for q in qs):
        return None
    return min(q.bitwidth for q in qs)


def _flat_outputs(out) -> list:
    from torch.utils import _pytree as pytree
    return [v for v in pytree.tree_leaves(out) if isinstance(v, torch.Tensor)]


def compare(got: list, want: list, steps: list) -> Parity:
    """Parity figures of onnxruntime outputs ``got`` against the sim's ``want``."""
    diff, worst, n, differing = 0.0, None, 0, 0
    for g, w, st in zip(got, want, steps):
        g = np.asarray(g, dtype=np.float64)
        w = w.detach().cpu().double().numpy().reshape(g.shape)
        d = np.abs(g - w)
        if d.size:
            diff = max(diff, float(d.max()))
            if st is not None:
                worst = max(worst or 0.0, float(d.max()) / st)
        n += d.size
        differing += int(np.count_nonzero(g != w))
    if any(st is None for st in steps):
        worst = None  # some output is float: steps are not defined for it
    return Parity(diff, worst, differing / max(n, 1), n)


def _sqnr_db(ref: list, got: list) -> float | None:
    """SQNR of ``got`` (tensors or arrays) against the float outputs ``ref`` (tensors), over
    all outputs together; None when some output is not floating point."""
    if len(ref) != len(got) or not all(r.is_floating_point() for r in ref):
        return None
    flat = [torch.cat([torch.as_tensor(t).detach().double().reshape(-1) for t in ts]) for ts in (got, ref)]
    return sqnr_db(*flat)


def check_parity(path: str, sim, dummy_input, model_proto=None, levels=LEVELS):
    """Run the exported model against the sim on ``dummy_input`` at each onnxruntime level.
    Returns ({level: Parity}, {level: error message})."""
    import onnx
    from rapidquant.export.runtime import OnnxRuntimeModule
    args = tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)
    with torch.no_grad():
        want = _flat_outputs(sim.model(*args))
        with sim.disabled():
            ref = _flat_outputs(sim.model(*args))
    proto = model_proto if model_proto is not None else onnx.load(path)
    qs = _output_quantizers(proto, sim)
    steps, bits = _steps(qs), _narrowest_bits(qs)
    parity, errors = {}, {}
    for level in levels:
        try:
            got = OnnxRuntimeModule(path, optimization=level)(*args)
            got = list(got) if isinstance(got, tuple) else [got]
            parity[level] = compare([g.numpy() for g in got], want, steps)
            parity[level].file_sqnr_db = _sqnr_db(ref, [g.numpy() for g in got])
            parity[level].sim_sqnr_db = _sqnr_db(ref, want)
            parity[level].output_bits = bits
        except Exception as e:  # noqa: BLE001 - reported: the file does not load/run at this level
            errors[level] = f"{type(e).__name__}: {e}"
    return parity, errors


def export_sim(sim, out_dir: str, dummy_input, filename: str = "model", *, encoding_format: str = "rapidquant",
               export_int32_bias: bool | str = True, overwrite: bool = False, opset: int | None = None,
               dynamic_batch: bool = True, unsigned_weights: bool = True,
               dynamic_dims: list | None = None) -> ExportResult:
    """export_int32_bias: write int32 bias encodings (scale = s_in * s_w) to the encodings
    file. The graph always carries the int32 biases the sim simulates (see _add_int32_bias).
    dynamic_dims: per positional input, the dims besides the batch to export symbolic.

    unsigned_weights: 8-bit weights of Conv/MatMul/Gemm layers with uint8 activations travel
    as uint8 codes, zero point + 128 (same grid): onnxruntime's int8-weight kernels overflow
    on x86 CPUs without VNNI (ort_guards). False keeps int8 for runtimes that require signed
    weights (TensorRT); the encodings file is the same either way.

    The result's ``parity`` holds sim vs onnxruntime on the dummy input with default session
    options and with ORT_DISABLE_ALL; a difference above PARITY_WARN_STEPS output steps, or
    a session that does not load, is warned about."""
    import onnx
    if encoding_format not in FORMATS:
        raise ValueError(f"encoding_format must be one of {FORMATS}")
    missing = [n for n, q in sim.quantizers().items() if q.enabled and not q.is_initialized]
    if missing:
        raise RuntimeError(f"cannot export before calibration: {len(missing)} enabled quantizers have no "
                           f"encoding (e.g. {missing[:5]}); run sim.compute_encodings(data) first")
    onnx_path = os.path.join(out_dir, filename + ".onnx")
    enc_path = os.path.join(out_dir, filename + ".encodings.json")
    check_writable(onnx_path, overwrite)
    check_writable(enc_path, overwrite)
    args = tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)
    seen: list = []
    from rapidquant.qmodules import float_biases
    # the int32 biases are written into the graph below; float leaves go in as recorded graphs
    wanted = list(dynamic_dims or []) + [[]] * (len(args) - len(dynamic_dims or []))
    # with the batch, an integer input's every dim goes symbolic: the leaves are checked on them too
    checked = [sorted(set(ds) | (set(range(1, a.dim())) if dynamic_batch and isinstance(a, torch.Tensor)
                                 and not a.is_floating_point() else set())) for ds, a in zip(wanted, args)]
    with float_biases(), recorded_float_leaves(sim, args, checked) as fixed_by_leaves:
        free = [[d for d in ds if (i, d) not in fixed_by_leaves] for i, ds in enumerate(wanted)]
        held = [[d for d in ds if (i, d) in fixed_by_leaves] for i, ds in enumerate(checked)]
        proto = _export_proto(sim.model, args, _translation_table(set(sim.param_quantizers()), seen),
                              opset or OPSET, dynamic_batch and "batch" not in fixed_by_leaves, free, held)
    _warn_fixed_dims(proto, dict(zip(sim.input_signature.names, wanted)), sim.calibration_sizes,
                     fixed_by_leaves)
    first, every, unmapped, folded, merged = _map_quantizers(proto, sim, seen)
    widen_weight_only_matmul_containers(proto)
    if unsigned_weights:
        unsigned_weight_containers(proto)
    bias = _add_int32_bias(proto, sim)
    drop_unused_initializers(proto)  # the float biases the int32 ones replaced: onnxruntime warns per one
    if not export_int32_bias:
        bias = {}  # the graph keeps the int32 biases the sim runs; the encodings file omits them
    tmp = onnx_path + ".tmp"
    onnx.save(proto, tmp)
    os.replace(tmp, onnx_path)
    if encoding_format == "rapidquant":
        doc = rapidquant_doc(sim, every, bias)
    else:
        doc = aimet_doc(sim, encoding_format, every, bias)
    write_json(doc, enc_path)
    res = ExportResult(onnx_path, enc_path, sum(len(v) for k, v in every.items() if k not in merged), first, every,
                       unmapped, folded, merged)
    if unmapped:
        warnings.warn(f"export: {len(unmapped)} enabled quantizers have no node in the ONNX graph: the exporter "
                      f"removed what they quantize because no model output uses it (a branch whose result is "
                      f"dropped, a recurrent layer's final state nobody reads), or, for a weight, its layer never "
                      f"ran: {unmapped[:8]}; the encodings file has no tensor for them", stacklevel=2)
    res.parity, res.ort_errors = check_parity(onnx_path, sim, dummy_input, proto)
    res.ort_ok = "default" in res.parity
    if res.ort_ok:
        res.ort_max_abs_diff = res.parity["default"].max_abs_diff
    _warn_parity(res)
    return res


def _warn_parity(res: ExportResult) -> None:
    for level, err in res.ort_errors.items():
        warnings.warn(f"the exported model {res.onnx} does not run in onnxruntime ({level} session options): "
                      f"{err}", stacklevel=3)
    for level, p in res.parity.items():
        if p.max_steps is None:
            if p.frac_differing > 0:
                logging.getLogger(__name__).info("export parity (%s): max |diff| %.4g on a float output", level,
                                                 p.max_abs_diff)
        elif p.max_steps <= PARITY_WARN_STEPS:
            pass
        elif p.same_quality() or p.file_better():  # steps apart, but the file is no worse
            how, verdict = (("with the sim's quality", "rounding ties its kernels resolve the other way, "
                             "carried through the layers; the file is as good as the sim scored")
                            if p.same_quality() else
                            ("and the file closer to the float model than the sim",
                             "the sim's score may understate the file; score the file itself (AutoQuant does)"))
            warnings.warn(f"onnxruntime ({level} session options) differs from the sim by up to {p.max_steps:.1f} "
                          f"output quantization steps on {100 * p.frac_differing:.1f}% of output elements, {how} "
                          f"(against the float model: file {p.file_sqnr_db:.1f} dB, sim {p.sim_sqnr_db:.1f} dB on the "
                          f"dummy input): {verdict}", stacklevel=3)
        else:
            quality = "" if p.same_quality() is None else (
                f"; against the float model the file measures {p.file_sqnr_db:.1f} dB, the sim {p.sim_sqnr_db:.1f} dB")
            warnings.warn(f"PARITY GAP: onnxruntime ({level} session options) differs from the sim by "
                          f"{p.max_steps:.1f} output quantization steps (max |diff| {p.max_abs_diff:.4g}, "
                          f"{100 * p.frac_differing:.1f}% of output elements differ) on the dummy input{quality}; "
                          "the deployed file does not compute what the sim scored", stacklevel=3)


def _dynamic_dims(a, extra=(), batch: bool = True, fixed=()):
    """The ``extra`` dims symbolic, and the batch when ``batch``; with the batch, every dim of
    integer inputs too (token ids and masks: sequence length) but those in ``fixed``."""
    if not isinstance(a, torch.Tensor) or not a.dim():
        return None
    dims = set(extra) | ({0} if batch else set())
    if batch and not a.is_floating_point():
        dims |= set(range(a.dim())) - set(fixed)
    return {d: torch.export.Dim.AUTO for d in sorted(dims) if d < a.dim()} or None


def _warn_fixed_dims(proto, wanted: dict, sizes: dict, fixed_by_leaves: dict) -> None:
    """Name the dims that were to be symbolic (seen at several sizes in calibration, or asked
    for) but that the file fixes: the model's code reads them as numbers. ``wanted``: input
    name -> dims."""
    names = list(wanted)
    fixed = []
    for vi in proto.graph.input:
        shape = vi.type.tensor_type.shape.dim
        for d in wanted.get(vi.name, ()):
            if d < len(shape) and shape[d].HasField("dim_value"):
                seen = sorted(sizes.get(vi.name, {}).get(d, ()))
                leaves = fixed_by_leaves.get((names.index(vi.name), d))
                why = "" if not leaves else (" (the model does not run with it doubled)" if leaves == [None] else
                                             f" (read as a number by the float leaves {leaves[:3]})")
                fixed.append(f"{vi.name} dim {d} = {shape[d].dim_value}" +
                             (f" (calibration saw {seen})" if len(seen) > 1 else "") + why)
    if fixed:
        warnings.warn("the exported file fixes input sizes that were to stay free: " + "; ".join(fixed) +
                      ". The model's code reads them as numbers during export (a reshape to a size computed "
                      "in Python, a loop over them), so the file takes only those sizes: export one file "
                      "per size you deploy, or make the code read sizes from tensor shapes", stacklevel=3)


def _export_proto(model, args, table, opset: int, dynamic_batch: bool, extra_dims: list = (), held: list = ()):
    """torch.onnx (dynamo) export of ``model`` with quantizers calling the named ops.
    ``dynamic_batch``: the batch symbolic where the model allows; ``extra_dims``: per input,
    more dims to try symbolic (then the batch alone, then none); ``held``: per input, dims a
    float leaf fixes."""
    was = model.training
    model.eval()
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch._dynamo", "torch.export")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:  # the exporter's progress chatter and constant-folding notes
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), named.carrying_names(), without_graph_dumps(), \
                cached_torchlib_registry():
            warnings.simplefilter("ignore")
            kw = dict(dynamo=True, opset_version=opset, custom_translation_table=table, verbose=False)
            scan_failed = []

            def export(**shapes):
                try:
                    return torch.onnx.export(model, unmarked(args), **shapes, **kw)
                except Exception as e:  # noqa: BLE001 - a Scan that cannot be traced: unroll it
                    if R.EXPORT_LOOP != "scan" or not R.has_twins(model):
                        raise
                    with R.unrolled_loops():
                        prog = torch.onnx.export(model, unmarked(args), **shapes, **kw)
                    scan_failed.append(e)  # only when unrolling is what made it export
                    return prog
            prog, failed = None, None
            none = [()] * len(args)
            extra, held = list(extra_dims) or none, list(held) or none  # per input, as export_sim gives them
            tries = ([extra] if any(extra) or dynamic_batch else []) + \
                ([none] if any(extra) and dynamic_batch else [])  # then the batch alone
            for dims in tries:  # symbolic where the model allows
                try:
                    shapes = tuple(_dynamic_dims(a, e, dynamic_batch, f) for a, e, f in zip(args, dims, held))
                    prog = export(dynamic_shapes=shapes)
                    break
                except Exception as e:  # noqa: BLE001 - fall back to fewer symbolic dims, then none
                    failed = e
            if prog is not None:
                failed = None
            if prog is None:
                prog = export()
    finally:
        model.train(was)
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    if failed is not None:
        warnings.warn(f"exporting with symbolic dims (the batch{', more' if any(extra_dims) else ''}) failed "
                      f"({type(failed).__name__}); "
                      "the ONNX model has the dummy input's fixed shapes", stacklevel=3)
    if scan_failed:
        root = scan_failed[-1]
        while root.__cause__ is not None:  # torch.onnx wraps the cause in pages of advice
            root = root.__cause__
        why = re.sub(r"\x1b\[[0-9;]*m", "", str(root)).strip().splitlines()[0][:160]
        warnings.warn(f"exporting the recurrent loops as ONNX Scan failed ({type(root).__name__}: "
                      f"{why}); they are unrolled over the dummy "
                      "input's time steps, so the file takes only that sequence length", stacklevel=3)
    return prog.model_proto

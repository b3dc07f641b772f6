"""Export a QuantSim to an ONNX model with QuantizeLinear/DequantizeLinear nodes.

torch.onnx (dynamo) exports sim.model; our ops translate to standard ONNX: an affine QDQ
becomes QuantizeLinear + DequantizeLinear (per tensor, per channel with ``axis``, or
blocked with ``block_size`` at opset 21), with the zero point in the smallest ONNX
integer type that holds [qmin, qmax] and a Max/Min clamp in front when the grid is
narrower than that type (2..7-bit grids use int8/uint8 containers). Float quantizers
become casts (fp16/bf16) or float8 QDQ. The parity check runs onnxruntime with basic graph
optimizations: its extended fusions may change fp8 numerics.
Afterwards Q nodes are matched to quantizer names (for the encodings file), int32 bias
encodings are added, and the model is run in onnxruntime against the sim.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from rapidquant.export.encodings import aimet_doc, rapidquant_doc, _check_writable, _dump, FORMATS
from rapidquant.ops.float_qdq import FORMAT_MAX
from rapidquant.quantizer import Quantizer

OPSET = 21


@dataclass
class ExportResult:
    onnx: str
    encodings: str
    qdq_pairs: int = 0
    tensor_names: dict = field(default_factory=dict)
    ort_max_abs_diff: float | None = None  # |sim - onnxruntime| on the dummy input
    ort_ok: bool | None = None


def _qtype(qmin: int, qmax: int):
    # 2..8-bit grids use int8/uint8 containers (with a clamp when narrower): onnxruntime's
    # optimizer fails on int4 activation QDQ after Relu/Clip; the encodings file keeps the
    # true bitwidth.
    from onnx import TensorProto as T
    for lo, hi, t in ((-128, 127, T.INT8), (0, 255, T.UINT8),
                      (-32768, 32767, T.INT16), (0, 65535, T.UINT16)):
        if lo <= qmin and qmax <= hi:
            return t, lo, hi
    raise ValueError(f"[{qmin}, {qmax}] does not fit an ONNX QuantizeLinear type (at most 16 bits)")


def _translation_table():
    from onnx import TensorProto as T
    from onnxscript import opset21 as op

    def qdq(x, scale, zero_point, qmin: int, qmax: int, block):
        block = list(block)
        rank = len(block)
        t, lo, hi = _qtype(qmin, qmax)
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
        zq = op.Cast(z, to=t)
        narrow = (qmin, qmax) != (lo, hi)
        xin = x
        if narrow and not blocked:  # narrower grid than the ONNX type: clamp x first
            xin = op.Min(op.Max(x, op.Mul(op.Sub(op.CastLike(qmin, scale), zero_point), scale)),
                         op.Mul(op.Sub(op.CastLike(qmax, scale), zero_point), scale))
        q = op.QuantizeLinear(xin, s, zq, **attrs)
        if narrow and blocked:  # blocked scales do not broadcast: clamp the integers instead
            q = op.Clip(q, op.Cast(op.Constant(value_int=qmin), to=t), op.Cast(op.Constant(value_int=qmax), to=t))
        return op.DequantizeLinear(q, s, zq, **attrs)

    def float_qdq(x, scale, fmt: int, block):
        if fmt in (0, 1):  # fp16 / bf16: saturate, cast, cast back
            m = op.CastLike(FORMAT_MAX[fmt], x)
            v = x if scale is None else op.Div(x, op.CastLike(scale, x))
            v = op.Min(op.Max(v, op.Neg(m)), m)
            v = op.CastLike(op.Cast(v, to=T.FLOAT16 if fmt == 0 else T.BFLOAT16), x)
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
        zq = op.Cast(op.Constant(value_float=0.0), to=t)
        if attrs:
            zq = op.Expand(zq, op.Shape(s))
        return op.DequantizeLinear(op.QuantizeLinear(x, s, zq, saturate=1, **attrs), s, zq, **attrs)

    return {torch.ops.rapidquant.quantize_dequantize.default: qdq,
            torch.ops.rapidquant.float_quantize_dequantize.default: float_qdq}


def _quantizer_paths(sim) -> dict:
    return {path: m for path, m in sim.model.named_modules() if isinstance(m, Quantizer)}


def _scope_of(node) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            import ast
            try:
                return list(ast.literal_eval(p.value))
            except (ValueError, SyntaxError):
                return []
    return []


def _match_quantizers(model_proto, sim) -> dict:
    """quantizer name -> name of the float tensor its QuantizeLinear consumes.

    The exporter records module scopes on each node: a quantizer's own path when it was
    called as a module, otherwise the wrapping QuantizedModule's path. Parameters are
    recognised by their initializer names (``<module>.module.<param>``).
    """
    from rapidquant.qmodules import QuantizedModule
    paths = _quantizer_paths(sim)
    wrappers = {p: m for p, m in sim.model.named_modules() if isinstance(m, QuantizedModule)}
    param_q = {}
    for p, m in wrappers.items():
        for key, q in m.param_quantizers.items():
            param_q[f"{p}.module.{m._param_names[key]}"] = q
    producer = {o: n for n in model_proto.graph.node for o in n.output}
    inits = {i.name for i in model_proto.graph.initializer}
    out = {}
    for node in model_proto.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        src = node.input[0]
        while src in producer and producer[src].op_type in ("Min", "Max"):  # narrow-grid clamp
            src = producer[src].input[0]
        if src in param_q:
            out.setdefault(param_q[src].name, src)
            continue
        for path in reversed(_scope_of(node)):  # innermost scope we know
            if path in paths:
                out.setdefault(paths[path].name, src)
                break
            if path in wrappers:
                w = wrappers[path]
                if src in inits:  # a constant-folded parameter (e.g. after a narrow-grid clamp)
                    free = [q for q in w.param_quantizers.values() if q.name not in out]
                    if free:
                        out[free[0].name] = src
                        break
                if w.output_quantizer is not None:
                    out.setdefault(w.output_quantizer.name, src)
                break
    return out


def _add_int32_bias(model_proto, sim, embed: bool = False) -> dict:
    """int32 encodings of Conv/Gemm biases, scale = s_input * s_weight. With ``embed`` the
    biases also become int32 initializers behind a DequantizeLinear in the graph."""
    from onnx import numpy_helper, helper
    g = model_proto.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def dq_scale(tensor):
        n = producer.get(tensor)
        if n is None or n.op_type != "DequantizeLinear":
            return None
        s = n.input[1]
        if s in inits:
            return numpy_helper.to_array(inits[s]).astype(np.float64)
        sp = producer.get(s)  # scale may pass through a Reshape/Tile of an initializer
        while sp is not None and sp.op_type in ("Reshape", "Tile", "Identity") and sp.input[0] not in inits:
            sp = producer.get(sp.input[0])
        if sp is not None and sp.input[0] in inits:
            return numpy_helper.to_array(inits[sp.input[0]]).astype(np.float64).reshape(-1)
        return None

    out = {}
    new_nodes = []
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm", "ConvTranspose") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        sx, sw = dq_scale(node.input[0]), dq_scale(node.input[1])
        if sx is None or sw is None or sx.size != 1:
            continue
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        sb = (sx.reshape(-1)[0] * sw.reshape(-1))
        if sb.size == 1:
            sb = np.full(b.shape, sb[0])
        if sb.shape != b.shape:
            continue
        sb = np.maximum(sb, np.finfo(np.float32).tiny).astype(np.float32)
        q = np.clip(np.rint(b / sb.astype(np.float64)), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
        name = node.input[2]
        out[name] = {"scale": sb.tolist(), "bitwidth": 32}
        if not embed:
            continue
        qname, sname, dqname = name + "_int32", name + "_int32_scale", name + "_dq"
        g.initializer.extend([numpy_helper.from_array(q, qname), numpy_helper.from_array(sb, sname)])
        new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname], [dqname], axis=0,
                                          name=name + "_DequantizeLinear"))
        node.input[2] = dqname
    # DequantizeLinear nodes must come before their users: put them first
    for n in reversed(new_nodes):
        g.node.insert(0, n)
    return out


def _run_ort(path: str, sim, dummy_input):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    args = dummy_input if isinstance(dummy_input, (tuple, list)) else (dummy_input,)
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(sess.get_inputs(), args)}
    got = sess.run(None, feeds)
    with torch.no_grad():
        want = sim.model(*args)
    want = want if isinstance(want, (tuple, list)) else (want,)
    diff = max(float(np.max(np.abs(g.astype(np.float64) - w.detach().cpu().double().numpy()))) if g.size else 0.0
               for g, w in zip(got, want))
    return diff


def export_sim(sim, out_dir: str, dummy_input, filename: str = "model", *, encoding_format: str = "rapidquant",
               export_int32_bias: bool | str = True, overwrite: bool = False, opset: int | None = None,
               dynamic_batch: bool = True) -> ExportResult:
    """export_int32_bias: True writes int32 bias encodings (scale = s_in * s_w) to the
    encodings file; "onnx" also puts the quantized biases in the graph. The sim does not
    simulate bias quantization, so only the default keeps onnxruntime bit-faithful to it
    (embedding shifts each pre-activation by up to half a bias step)."""
    import onnx
    if encoding_format not in FORMATS:
        raise ValueError(f"encoding_format must be one of {FORMATS}")
    missing = [n for n, q in sim.quantizers().items() if q.enabled and not q.is_initialized]
    if missing:
        raise RuntimeError(f"cannot export before calibration: {len(missing)} enabled quantizers have no "
                           f"encoding (e.g. {missing[:5]}); run sim.compute_encodings(data) first")
    onnx_path = os.path.join(out_dir, filename + ".onnx")
    enc_path = os.path.join(out_dir, filename + ".encodings.json")
    _check_writable(onnx_path, overwrite)
    _check_writable(enc_path, overwrite)
    args = tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)
    model = sim.model
    was = model.training
    model.eval()
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch._dynamo", "torch.export")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:  # the exporter's progress chatter and constant-folding notes
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kw = dict(dynamo=True, opset_version=opset or OPSET, custom_translation_table=_translation_table(),
                      verbose=False)
            prog = None
            if dynamic_batch:  # batch dimension symbolic where the model allows it
                try:
                    dims = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() else None
                                 for a in args)
                    prog = torch.onnx.export(model, args, dynamic_shapes=dims, **kw)
                except Exception as e:  # noqa: BLE001 - fall back to the dummy input's shapes
                    warnings.warn(f"exporting with a dynamic batch dimension failed ({type(e).__name__}); "
                                  "the ONNX model has the dummy input's fixed shapes")
                    prog = None
            if prog is None:
                prog = torch.onnx.export(model, args, **kw)
    finally:
        model.train(was)
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    proto = prog.model_proto
    names = _match_quantizers(proto, sim)
    bias = _add_int32_bias(proto, sim, embed=export_int32_bias == "onnx") if export_int32_bias else {}
    tmp = onnx_path + ".tmp"
    onnx.save(proto, tmp)
    os.replace(tmp, onnx_path)
    if encoding_format == "rapidquant":
        doc = rapidquant_doc(sim, names, bias)
    else:
        doc = aimet_doc(sim, encoding_format, names, bias)
    _dump(doc, enc_path)
    res = ExportResult(onnx_path, enc_path, sum(n.op_type == "QuantizeLinear" for n in proto.graph.node), names)
    try:
        res.ort_max_abs_diff = _run_ort(onnx_path, sim, dummy_input)
        res.ort_ok = True
    except Exception as e:  # the export stands; say why it did not run
        warnings.warn(f"the exported model did not run in onnxruntime: {e}", stacklevel=2)
        res.ort_ok = False
    return res

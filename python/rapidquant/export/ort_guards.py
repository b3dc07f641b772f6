"""Representations that keep onnxruntime's default optimizer and kernels from changing the
computation.

Signed 8-bit weights (uint8 activations). onnxruntime's x86 integer GEMM/conv kernels for
uint8 x int8 on CPUs without VNNI (AVX2, and AVX-512 without the VNNI extension) multiply
with vpmaddubsw, which adds two products into a saturating int16: 255 * 127 * 2
overflows it. A three-layer W8A8 MLP then differs from the sim by 22 output steps on 91% of
its outputs at the default level (0 steps at ORT_DISABLE_ALL) on such a machine (an AVX2
AMD EPYC, onnxruntime 1.32), and by at most one step on an AVX-512 one. The uint8 x uint8
kernels widen to 16 bits before multiplying (0 steps on the AVX2 machine), so such weights
travel as uint8 codes with zero point + 128: the same grid, the same saturation bounds,
shifted. ARM and GPU runtimes were not measured.

onnxruntime (1.2x-1.3x, default session options) fuses DequantizeLinear(8-bit weight) ->
MatMul/Gemm into MatMulNBits whenever the other input is not an 8-bit QDQ tensor (a 16-bit
activation, or a float one), and runs it at ``session.qdq_matmulnbits_accuracy_level`` 4: the
activation is quantized to int8 per block of 32 on the fly. A W8A16 transformer layer then
differs from the sim by hundreds of output steps on nearly every element (measured: 312
steps on 99% of the outputs of a two-layer MLP on 3-D input; 0 steps with ORT_DISABLE_ALL).
The fusion takes only 2/4/8-bit weight types, so such weights travel in an int16 (uint16)
container: the same codes, zero point and scale, one DequantizeLinear the optimizer leaves
alone. Weights whose MatMul reads an 8-bit QDQ activation stay int8: onnxruntime runs those
as exact integer kernels (MatMulIntegerToFloat, QLinearMatMul, QGemm).
"""
from __future__ import annotations

from rapidquant.export.onnx_graph import producers

_PASS_THROUGH = ("Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten")  # layout ops between DQ and MatMul


def _source(name: str, producer: dict, through=_PASS_THROUGH):
    """The node that makes ``name``, looking through layout-only ops."""
    node = producer.get(name)
    while node is not None and node.op_type in through:
        node = producer.get(node.input[0])
    return node


def _eight_bit(node, inits: dict) -> bool:
    """A QuantizeLinear/DequantizeLinear whose zero point is an 8-bit initializer."""
    from onnx import TensorProto as T
    return _zero_point_type(node, inits) in (T.INT8, T.UINT8)


def _codes_fit(q, inits: dict) -> bool:
    """Whether every code of a QuantizeLinear on a constant weight lies in the 8-bit container
    (then a wider container saturates nothing, and computes the same). A clipping weight grid
    (percentile/MSE schemes, loaded encodings) does not, and keeps its int8 container."""
    import numpy as np
    from onnx import numpy_helper
    w = numpy_helper.to_array(inits[q.input[0]]).astype(np.float32)
    s = numpy_helper.to_array(inits[q.input[1]]).astype(np.float32)
    z = numpy_helper.to_array(inits[q.input[2]])
    lo, hi = np.iinfo(z.dtype).min, np.iinfo(z.dtype).max
    attrs = {a.name: a.i for a in q.attribute}
    if s.size > 1:  # per channel (blocked weights are not 8-bit MatMul candidates here)
        if attrs.get("block_size"):
            return False
        shape = [1] * w.ndim
        shape[attrs.get("axis", 1) % w.ndim] = s.size
        s, z = s.reshape(shape), z.reshape(shape)
    codes = np.rint(w / s) + z.astype(np.float32)  # QuantizeLinear's float32 division, ties to even
    return bool(codes.min() >= lo and codes.max() <= hi)


def widen_weight_only_matmul_containers(model_proto) -> list[str]:
    """Put 8-bit weights of MatMul/Gemm nodes whose activation input is not 8-bit QDQ into
    16-bit containers (see the module doc). Returns the weight tensors moved."""
    from onnx import TensorProto as T
    from onnx import numpy_helper
    g = model_proto.graph
    inits = {i.name: i for i in g.initializer}
    producer = producers(g)
    moved = []
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        act = _source(node.input[0], producer)
        if act is not None and act.op_type == "DequantizeLinear" and _eight_bit(act, inits):
            continue  # an integer kernel takes it
        dq = _source(node.input[1], producer)
        if dq is None or dq.op_type != "DequantizeLinear" or not _eight_bit(dq, inits):
            continue
        q = producer.get(dq.input[0])  # a narrow grid's integer Clip sits between: left as it is
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in inits or not _eight_bit(q, inits):
            continue
        zp = inits[dq.input[2]]
        if not _codes_fit(q, inits):
            continue  # a clipping weight grid needs the 8-bit container's saturation: left as it is
        wide = T.INT16 if zp.data_type == T.INT8 else T.UINT16
        new = numpy_helper.from_array(numpy_helper.to_array(zp).astype("int16" if wide == T.INT16 else "uint16"),
                                      dq.input[2] + "_16")
        if new.name not in inits:
            g.initializer.append(new)
            inits[new.name] = new
        q.input[2] = dq.input[2] = new.name
        for a in q.attribute:
            if a.name == "output_dtype":
                a.i = wide
        for v in g.value_info:  # the codes' declared type
            if v.name == q.output[0]:
                v.type.tensor_type.elem_type = wide
        moved.append(q.input[0])
    return moved


_INTEGER_KERNEL_OPS = ("Conv", "MatMul", "Gemm")  # ops onnxruntime fuses with QDQ into integer kernels
# ops onnxruntime's QDQ propagation moves a Q/DQ pair across: the kernel still reads uint8
_ACT_THROUGH = _PASS_THROUGH + ("MaxPool", "Pad", "Slice", "Resize")


def unsigned_weight_containers(model_proto) -> list[str]:
    """Move int8 weights of Conv/MatMul/Gemm nodes whose activation is uint8 QDQ to uint8
    containers (zero point + 128; see the module doc). Returns the weight tensors moved."""
    from onnx import TensorProto as T
    g = model_proto.graph
    inits = {i.name: i for i in g.initializer}
    producer = producers(g)
    users: dict = {}
    for n in g.node:
        for t in n.input:
            users.setdefault(t, []).append(n)
    moved, kept = [], []
    for node in g.node:
        if node.op_type not in _INTEGER_KERNEL_OPS or len(node.input) < 2:
            continue
        act, dq = _source(node.input[0], producer, _ACT_THROUGH), _source(node.input[1], producer)
        if act is None or act.op_type != "DequantizeLinear" or _zero_point_type(act, inits) != T.UINT8:
            continue
        if dq is None or dq.op_type != "DequantizeLinear" or _zero_point_type(dq, inits) != T.INT8:
            continue
        chain = _weight_codes(dq, producer, users, inits)
        if chain is None:
            kept.append(dq.input[0])
            continue
        q, clip, dqs = chain
        for n in (q, *dqs):
            n.input[2] = _shifted(inits, g, n.input[2])
        if clip is not None:  # a narrow grid's integer clamp on the codes
            clip.input[1], clip.input[2] = _shifted(inits, g, clip.input[1]), _shifted(inits, g, clip.input[2])
        for a in q.attribute:
            if a.name == "output_dtype":
                a.i = T.UINT8
        codes = {q.output[0]} | ({clip.output[0]} if clip is not None else set())
        for v in g.value_info:  # the codes' declared type
            if v.name in codes:
                v.type.tensor_type.elem_type = T.UINT8
        moved.append(q.input[0])
    if kept:
        import warnings
        warnings.warn(f"export: {len(kept)} int8 weights of integer kernels stay int8 (their codes also feed other "
                      f"ops): {kept[:5]}; onnxruntime on x86 CPUs without VNNI may saturate their products",
                      stacklevel=3)
    return moved


def _weight_codes(dq, producer: dict, users: dict, inits: dict):
    """(QuantizeLinear of a constant, its integer Clip or None, every DequantizeLinear of those
    codes) for a weight's DequantizeLinear; None where the codes go anywhere else."""
    clip = producer.get(dq.input[0])
    q = producer.get(clip.input[0]) if clip is not None and clip.op_type == "Clip" else clip
    clip = None if clip is q else clip
    if q is None or q.op_type != "QuantizeLinear" or q.input[0] not in inits or q.input[2] != dq.input[2]:
        return None
    if clip is not None and not (len(clip.input) == 3 and clip.input[1] in inits and clip.input[2] in inits):
        return None
    codes = users.get((clip or q).output[0], [])
    if (clip is not None and users.get(q.output[0]) != [clip]) or \
            not all(u.op_type == "DequantizeLinear" and u.input[2] == dq.input[2] for u in codes):
        return None
    return q, clip, codes


def _shifted(inits: dict, g, name: str) -> str:
    """An int8 initializer + 128 as uint8 (made once per name)."""
    import numpy as np
    from onnx import numpy_helper
    new = name + "_u8"
    if new not in inits:
        inits[new] = numpy_helper.from_array((numpy_helper.to_array(inits[name]).astype(np.int16) + 128)
                                             .astype(np.uint8), new)
        g.initializer.append(inits[new])
    return new


def _zero_point_type(node, inits: dict):
    zp = inits.get(node.input[2]) if len(node.input) > 2 else None
    return None if zp is None else zp.data_type

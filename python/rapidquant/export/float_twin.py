"""The float twin of an exported QDQ file: the same graph with its quantization undone.

Every DequantizeLinear fed by a QuantizeLinear (directly, or through the Clip of a grid narrower
than its container) becomes an Identity of the Q's input, and every
DequantizeLinear of a constant (int32 biases) becomes that constant dequantized, in float. The
twin runs what the file runs minus the quantization: the latency measurement's float reference,
without a second torch.onnx export of the model (which costs seconds: capture, decompositions,
optimizer). Its weights are the quantized grid's values; latency does not depend on them.
"""
from __future__ import annotations

import numpy as np


def _dequantized(node, inits: dict):
    """The float value of a DequantizeLinear of initializers, or None when its layout is one
    this does not undo (blocked quantization, a non-constant scale or zero point)."""
    from onnx import helper, numpy_helper
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("block_size", 0):
        return None
    names = list(node.input) + [""] * (3 - len(node.input))
    if names[1] not in inits or (names[2] and names[2] not in inits):
        return None
    q = numpy_helper.to_array(inits[names[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[names[1]]).astype(np.float64)
    zp = numpy_helper.to_array(inits[names[2]]).astype(np.float64) if names[2] else np.zeros_like(scale)
    if scale.size > 1:  # per axis: broadcast along it
        axis = attrs.get("axis", 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((q - zp) * scale).astype(np.float32)


def strip_qdq(model):
    """A copy of the ONNX model with its quantize/dequantize nodes undone, or None when it has
    one this cannot undo (the caller then exports the float model instead)."""
    import copy

    from onnx import helper, numpy_helper
    m = copy.deepcopy(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    nodes, new_inits = [], []
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            nodes.append(n)
            continue
        src = producer.get(n.input[0])
        while src is not None and src.op_type == "Clip":  # a narrow grid in a wider container: Q, Clip, DQ
            src = producer.get(src.input[0])
        if src is not None and src.op_type == "QuantizeLinear":
            nodes.append(helper.make_node("Identity", [src.input[0]], [n.output[0]], name=n.name + "_float"))
        elif n.input[0] in inits:
            value = _dequantized(n, inits)
            if value is None:
                return None
            new_inits.append(numpy_helper.from_array(value, n.output[0]))
        else:
            return None
    kept = nodes
    while True:  # drop the Q (and Clip) nodes nothing reads any more
        used = {i for n in kept for i in n.input} | {o.name for o in g.output}
        dead = [n for n in kept if n.op_type in ("QuantizeLinear", "Clip") and not any(o in used for o in n.output)]
        if not dead:
            break
        kept = [n for n in kept if n not in dead]
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in kept):
        return None  # a quantized value some other node reads: not a QDQ pair
    del g.node[:]
    g.node.extend(kept)
    remaining = [i for i in g.initializer if i.name in used] + new_inits
    del g.initializer[:]
    g.initializer.extend(remaining)
    produced = {o for n in kept for o in n.output}
    infos = [v for v in g.value_info if v.name in produced]
    del g.value_info[:]
    g.value_info.extend(infos)
    return m


def write_float_twin(onnx_path: str, out_path: str) -> bool:
    """Write the float twin of ``onnx_path`` to ``out_path``; False when it cannot be made."""
    import onnx
    twin = strip_qdq(onnx.load(onnx_path))
    if twin is None:
        return False
    onnx.save(twin, out_path)
    return True

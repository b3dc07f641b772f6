"""The same tensor through ONNX QuantizeLinear/DequantizeLinear in onnxruntime equals ours bit for bit."""
import numpy as np
import pytest
import torch

from rapidquant import ops

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

QTYPES = {  # (qmin, qmax) -> (onnx type, numpy dtype, min opset)
    (-128, 127): (TensorProto.INT8, np.int8, 13),
    (0, 255): (TensorProto.UINT8, np.uint8, 13),
    (-32768, 32767): (TensorProto.INT16, np.int16, 21),
    (0, 65535): (TensorProto.UINT16, np.uint16, 21),
    (-8, 7): (TensorProto.INT4, None, 21),
    (0, 15): (TensorProto.UINT4, None, 21),
}


def run_qdq_in_ort(x, scale, zp, qmin, qmax, axis=None, block_size=None):
    qtype, npdt, opset = QTYPES[(qmin, qmax)]
    if block_size is not None:
        opset = 21
    if npdt is None:  # 4-bit zero points via make_tensor with raw ints
        zp_t = helper.make_tensor("zp", qtype, list(zp.shape), zp.reshape(-1).astype(np.int64).tolist())
    else:
        zp_t = numpy_helper.from_array(zp.astype(npdt), "zp")
    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if block_size is not None:
        attrs["block_size"] = block_size
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], **attrs),
    ]
    graph = helper.make_graph(
        nodes, "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        initializer=[numpy_helper.from_array(scale.astype(np.float32), "scale"), zp_t],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the Q/DQ pair
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # an onnxruntime without this type/opset
        pytest.skip(f"onnxruntime {ort.__version__} cannot run this QDQ graph: {e}")
    return sess.run(None, {"x": x})[0]


def sample(shape, scale_hint):
    x = np.random.RandomState(0).randn(*shape).astype(np.float32) * scale_hint
    x.reshape(-1)[:4] = [np.inf, -np.inf, 1e30, -1e30]  # saturation
    return x


@pytest.mark.parametrize("qrange", list(QTYPES))
def test_per_tensor_parity(qrange):
    qmin, qmax = qrange
    x = sample((64, 33), (qmax - qmin) * 0.01)
    scale = np.array(0.013, dtype=np.float32)
    zp = np.array((qmin + qmax) // 2 + 1)
    # exact .5 ties: x / scale lands on k + 0.5
    x.reshape(-1)[4:12] = (np.arange(8) + 0.5 + qmin // 4) * scale
    ours = ops.quantize_dequantize(torch.from_numpy(x), torch.from_numpy(scale), torch.tensor(float(zp)), qmin, qmax)
    theirs = run_qdq_in_ort(x, scale, zp, qmin, qmax)
    np.testing.assert_array_equal(ours.numpy(), theirs)


@pytest.mark.parametrize("qrange", [(-128, 127), (0, 255), (-32768, 32767), (-8, 7)])
@pytest.mark.parametrize("axis", [0, 1, 3])
def test_per_channel_parity(qrange, axis):
    qmin, qmax = qrange
    x = sample((6, 5, 4, 7), 3.0)
    C = x.shape[axis]
    scale = (np.random.RandomState(1).rand(C) * 0.05 + 0.002).astype(np.float32)
    zp = np.random.RandomState(2).randint(qmin, qmax + 1, C)
    ours = ops.quantize_dequantize(torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(zp).float(), qmin, qmax, axis=axis)
    theirs = run_qdq_in_ort(x, scale, zp, qmin, qmax, axis=axis)
    np.testing.assert_array_equal(ours.numpy(), theirs)


@pytest.mark.parametrize("qrange", [(-128, 127), (-8, 7)])
def test_blocked_parity(qrange):
    # ONNX blocked quantization: scale has x's shape with dim `axis` divided by block_size
    qmin, qmax = qrange
    x = sample((8, 64), 1.0)
    scale = (np.random.RandomState(3).rand(8, 4) * 0.05 + 0.01).astype(np.float32)
    zp = np.random.RandomState(4).randint(qmin, qmax + 1, (8, 4))
    ours = ops.quantize_dequantize(torch.from_numpy(x), torch.from_numpy(scale), torch.from_numpy(zp).float(),
                                   qmin, qmax, block_size=(1, 16))
    theirs = run_qdq_in_ort(x, scale, zp, qmin, qmax, axis=1, block_size=16)
    np.testing.assert_array_equal(ours.numpy(), theirs)


def test_quantize_only_matches_ort_integers():
    x = sample((50, 20), 2.0)
    scale = np.array(0.02, dtype=np.float32)
    node = helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [50, 20])],
                              [helper.make_tensor_value_info("q", TensorProto.INT8, [50, 20])],
                              initializer=[numpy_helper.from_array(scale, "scale"),
                                           numpy_helper.from_array(np.array(3, dtype=np.int8), "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    q_ort = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    q = ops.quantize(torch.from_numpy(x), torch.tensor(0.02), torch.tensor(3.0), -128, 127)
    np.testing.assert_array_equal(q.numpy(), q_ort)

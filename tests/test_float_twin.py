"""The float twin of an exported QDQ file (the latency measurement's float reference): the
same graph with its quantization undone, computing the float model."""
import numpy as np
import onnx
import pytest
import torch

import rapidquant as rq
from rapidquant import zoo
from rapidquant.export.float_twin import strip_qdq
from rapidquant.export.latency import float_reference

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _exported(tmp_path, name, **cfg):
    model = zoo.pretrained(name)
    rq.fold_batch_norms_(model)
    calib = zoo.calibration_batches(4)
    sim = rq.QuantSim(model, calib[0], rq.QuantSimConfig(**cfg))
    sim.compute_encodings(calib, show_progress=False)
    return sim, sim.export(str(tmp_path), calib[0], "model").onnx, calib[0]


# bound: twice the max |twin - float| measured (0.039 of outputs up to 10 with 4-bit weights,
# whose int32 bias grid is coarse; 3e-4 at 8 bits) and far below the quantized file's own
# difference from float (7.9 and 0.13)
@pytest.mark.parametrize("name,cfg,bound", [
    ("digits_mobilenet", dict(param_bw=4, act_bw=8, per_channel=False), 0.08),  # 4-bit grids: Q, Clip, DQ
    ("digits_resnet", dict(param_bw=8, act_bw=8, per_channel=True), 1e-3),      # per-channel int32 biases
])
def test_twin_has_no_quantization_and_computes_the_float_model(tmp_path, name, cfg, bound):
    sim, path, x = _exported(tmp_path, name, **cfg)
    quantized = onnx.load(path)
    twin = strip_qdq(quantized)
    assert twin is not None
    onnx.checker.check_model(twin)
    ops = {n.op_type for n in twin.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    assert any(n.op_type == "DequantizeLinear" for n in quantized.graph.node)  # it had some to undo
    import onnxruntime as ort
    sess = ort.InferenceSession(twin.SerializeToString())
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad(), sim.disabled():
        ref = sim.model(x).numpy()  # the float model
    # the twin's weights are the float weights its Q nodes read, its biases the int32 ones
    # dequantized (the float model adds its float biases)
    assert np.abs(out - ref).max() < bound
    assert np.abs(ref).max() > 1.0


def test_what_it_cannot_undo_falls_back_to_the_float_export(tmp_path):
    """A DequantizeLinear that reads neither a QuantizeLinear nor a constant is not a QDQ pair:
    no twin; the latency reference then exports the sim with its quantizers off."""
    sim, path, x = _exported(tmp_path, "digits_resnet", param_bw=8, act_bw=8)
    m = onnx.load(path)
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear")
    q.op_type, q.domain = "Identity", ""  # its DQ now reads a plain tensor
    del q.input[1:]
    assert strip_qdq(m) is None
    onnx.save(m, str(tmp_path / "odd.onnx"))
    ref = float_reference(sim, x, str(tmp_path / "odd.onnx"), str(tmp_path / "lat"))
    assert ref.endswith("float_reference.onnx")
    assert not {n.op_type for n in onnx.load(ref).graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    # the usual case: the twin, written beside
    ref = float_reference(sim, x, path, str(tmp_path / "lat2"))
    assert not {n.op_type for n in onnx.load(ref).graph.node} & {"QuantizeLinear", "DequantizeLinear"}

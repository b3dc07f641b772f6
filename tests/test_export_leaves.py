"""Float leaves that read tensor values as Python numbers still export (export/leaves.py).

The modules below behave as onnx2torch's converted ONNX ops do: they receive constant
tensors (the ONNX initializers) as arguments and read them with .tolist() / .numpy() / an
``if`` on their values, so neither torch.fx nor torch.export can trace them; QuantSim keeps
them whole in float, and the export records them with real values."""
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rapidquant as rq


class ConstResize(nn.Module):
    def forward(self, x, scales):
        mode = {1: "linear", 2: "nearest"}[x.dim() - 2]  # a dict keyed by the rank: torch.fx cannot
        s = scales.tolist()
        if s[:2] != [1.0, 1.0]:
            raise NotImplementedError("batch/channel scaling")
        return F.interpolate(x, scale_factor=s[2:], mode=mode)


class ConstSlice(nn.Module):
    def forward(self, x, starts, ends):
        if not x.is_floating_point():  # a branch on a traced value: torch.fx cannot
            raise TypeError("float input expected")
        lo, hi = starts.detach().cpu().numpy(), ends.detach().cpu().numpy()
        return x[:, int(lo[0]):int(hi[0])]


class ShapeReshape(nn.Module):
    """onnx2torch's Reshape: ``0`` in the target shape keeps that dimension."""

    def forward(self, x, shape):
        if torch.any(shape == 0):
            shape = torch.where(shape == 0, torch.tensor(x.shape[:len(shape)]), shape)
        return torch.reshape(x, shape.tolist())


class Head(nn.Module):
    def __init__(self, flatten_by_shape: bool):  # True: the reshape reads the batch off its input
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.resize, self.slice, self.reshape = ConstResize(), ConstSlice(), ShapeReshape()
        self.register_buffer("scales", torch.tensor([1.0, 1.0, 2.0, 2.0]))
        self.register_buffer("starts", torch.tensor([1]))
        self.register_buffer("ends", torch.tensor([7]))
        self.register_buffer("flat", torch.tensor([-1, 4 * 16 * 16]))
        self.register_buffer("keep_batch", torch.tensor([0, -1]))  # ONNX Reshape: 0 keeps that dimension
        self.flatten_by_shape = flatten_by_shape

    def forward(self, x):
        y = self.slice(self.resize(torch.relu(self.conv1(x)), self.scales), self.starts, self.ends)
        y = self.conv2(y)
        return self.reshape(y, self.keep_batch if self.flatten_by_shape else self.flat)


def _sim(model, batch=2):
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = rq.QuantSim(model.eval(), data[0])
    sim.compute_encodings(data, show_progress=False)
    return sim, data[0]


def _ort(path, x):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_leaves_that_read_constants_export_with_a_dynamic_batch(tmp_path):
    sim, x = _sim(Head(flatten_by_shape=False))
    assert {"resize", "slice"} <= set(sim.float_leaves), sim.float_leaves
    # capture tried torch.export on the dummy; the user's tensor carries no dynamic-shape marks
    # (a later export of it would turn every dimension dynamic)
    assert not getattr(x, "_has_dynamo_dim_marking", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no parity gap, no fixed-batch warning
        res = sim.export(str(tmp_path), x)
    assert res.ort_ok and res.parity["default"].frac_differing == 0, res.parity
    x5 = torch.randn(5, 3, 8, 8)  # another batch size runs, and agrees with the sim
    with torch.no_grad():
        want = sim.model(x5).numpy()
    np.testing.assert_array_equal(_ort(res.onnx, x5), want)
    for m in (sim.model.resize, sim.model.slice):  # the model is given back as it was
        assert not any(type(c).__name__ == "_Recorded" for c in m.modules())


def test_a_leaf_that_reads_the_batch_size_fixes_the_files_batch(tmp_path):
    sim, x = _sim(Head(flatten_by_shape=True))
    assert "reshape" in sim.float_leaves, sim.float_leaves
    with pytest.warns(UserWarning, match="read the batch size"):
        res = sim.export(str(tmp_path), x)
    assert res.ort_ok and res.parity["default"].frac_differing == 0, res.parity
    sess = ort.InferenceSession(res.onnx, providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == x.shape[0]

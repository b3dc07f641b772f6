"""torch.onnx's torchlib registry built once per opset during our exports (export/registry_cache)."""
import contextlib

import pytest
import torch

pytest.importorskip("onnx")

R = pytest.importorskip("torch.onnx._internal.exporter._registration")  # the private module it caches

import rapidquant as rq  # noqa: E402
from rapidquant.export import registry_cache as RC  # noqa: E402


def _export(tmp_path, name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 12, 12)
    sim = rq.QuantSim(model, x, rq.QuantSimConfig(param_bw=8, act_bw=8, per_channel=True))
    sim.compute_encodings([x], show_progress=False)
    return open(sim.export(str(tmp_path), x, name).onnx, "rb").read()


def test_exports_are_the_same_file_with_and_without_the_kept_registry(tmp_path, monkeypatch):
    cached = [_export(tmp_path, "a"), _export(tmp_path, "b")]
    monkeypatch.setattr("rapidquant.export.onnx_qdq.cached_torchlib_registry", contextlib.nullcontext)
    plain = _export(tmp_path, "c")
    assert cached[0] == cached[1] == plain


def test_the_kept_registry_stays_pristine_and_the_patch_is_undone():
    before = R.ONNXRegistry.__dict__["from_torchlib"]
    with RC.cached_torchlib_registry():
        with RC.cached_torchlib_registry():  # nested (an export inside an export's context)
            a = R.ONNXRegistry.from_torchlib()
        b = R.ONNXRegistry().from_torchlib(opset_version=a.opset_version)
        a.register_op(torch.ops.rapidquant.quantize_dequantize.default, lambda x: x)
        assert a.functions is not b.functions
        assert not b.get_decomps(torch.ops.rapidquant.quantize_dequantize.default)  # a's translation stayed in a
        assert a.get_decomps(torch.ops.aten.relu.default)  # a copy of the whole torchlib table
    assert R.ONNXRegistry.__dict__["from_torchlib"] is before
    kept = RC._KEPT[a.opset_version]
    assert not kept.get_decomps(torch.ops.rapidquant.quantize_dequantize.default)


def test_another_torch_layout_is_left_alone(monkeypatch):
    """Where the private registry lacks what the cache copies, nothing is patched."""
    class Other:
        @classmethod
        def from_torchlib(cls, opset_version=18):
            return "built"
    monkeypatch.setattr(R, "ONNXRegistry", Other)
    with RC.cached_torchlib_registry():
        assert R.ONNXRegistry.__dict__["from_torchlib"] is Other.__dict__["from_torchlib"]
        assert Other.from_torchlib() == "built"

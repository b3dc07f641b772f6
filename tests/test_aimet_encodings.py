"""Encodings files written by AIMET load into a sim and reproduce AIMET's simulation.

The files in tests/data/aimet were written by aimet-torch 2.42 (make_fixtures.py there says
how): its legacy export (0.6.1 and 1.0.0, tensor names of the TorchScript ONNX export, and the
module-keyed _torch.encodings) and its sim.onnx.export (2.0.0, dynamo tensor names), with
AIMET's own simulated output on a held-out batch.
"""
import importlib.util
import json
import os
import shutil

import pytest
import torch

import rapidquant as rq

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
DATA = os.path.join(os.path.dirname(__file__), "data", "aimet")


def _fixture():
    spec = importlib.util.spec_from_file_location("aimet_fixtures", os.path.join(DATA, "make_fixtures.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    saved = torch.load(os.path.join(DATA, "net.pt"), weights_only=True)
    model = mod.Net().eval()
    model.load_state_dict(saved["state_dict"])
    return model, mod.batches()[0], saved


FILES = ["v0/net.encodings", "v1/net.encodings", "v1/net_torch.encodings", "v2/net.encodings"]


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("name", FILES)
def test_aimet_files_reproduce_aimets_simulation(name, method):
    model, dummy, saved = _fixture()
    sim = rq.QuantSim(model, dummy, rq.QuantSimConfig(capture=method))
    report = sim.load_encodings(os.path.join(DATA, name))  # strict: every record placed
    assert not report.unplaced
    placed = {q for qs in report.placed.values() for q in qs}
    assert {"stem.weight", "block.conv.weight", "fc.weight", "act.output", "block.bn.output",
            "block.relu.output", "pool.output", "fc.output"} <= placed
    assert any(q.startswith("input_") for q in placed)  # the model input ('t.1' / 'x')
    with torch.no_grad():
        out = sim.model(saved["x"])
    # measured: bit-exact (same grids, same float ops on this small net)
    assert torch.equal(out, saved["aimet_output"])
    assert all(q.frozen for q in sim.quantizers().values() if q.enabled)


def test_quantizers_the_file_does_not_list_are_disabled():
    model, dummy, _ = _fixture()
    sim = rq.QuantSim(model, dummy)
    assert sim.quantizer("mul.output").enabled  # the sim quantizes the functional x * 0.5 ...
    report = sim.load_encodings(os.path.join(DATA, "v1/net_torch.encodings"))
    assert report.disabled == ["mul.output"]    # ... AIMET's model does not
    assert not sim.quantizer("mul.output").enabled


def test_without_the_onnx_model_names_are_parsed_and_the_rest_is_named(tmp_path):
    model, dummy, saved = _fixture()
    alone = tmp_path / "net.encodings"
    shutil.copy(os.path.join(DATA, "v1/net.encodings"), alone)  # no net.onnx beside it
    sim = rq.QuantSim(model, dummy)
    with pytest.raises(KeyError, match=r"onnx_model=") as e:
        sim.load_encodings(str(alone))
    assert "'t.1'" in str(e.value)  # the input's TorchScript name says nothing of its place
    with pytest.warns(UserWarning, match="match no quantizer"):
        report = sim.load_encodings(str(alone), strict=False)
    # scoped names ('/block/relu/Relu_output_0', '/Mul_output_0'-style) place without the graph
    assert report.placed["/block/relu/Relu_output_0"] == ["block.relu.output"]
    assert set(report.unplaced) == {"t.1", "40"}
    report = sim.load_encodings(str(alone), onnx_model=os.path.join(DATA, "v1/net.onnx"))
    assert not report.unplaced


def test_float_records_load_as_float_quantizers(tmp_path):
    model, dummy, _ = _fixture()
    doc = json.load(open(os.path.join(DATA, "v2/net.encodings")))
    for r in doc["encodings"]:
        if r["name"] == "relu":
            r.clear()
            r.update(name="relu", output_dtype="float16")
    path = tmp_path / "net.encodings"
    path.write_text(json.dumps(doc))
    shutil.copy(os.path.join(DATA, "v2/net.onnx"), tmp_path / "net.onnx")
    sim = rq.QuantSim(model, dummy)
    sim.load_encodings(str(path))
    q = sim.quantizer("block.relu.output")
    assert (q.dtype, q.bitwidth, q.float_format, q.enabled) == ("float", 16, "fp16", True)
    v1 = json.load(open(os.path.join(DATA, "v1/net.encodings")))
    for r in v1["activation_encodings"]:
        if r["name"] == "/block/relu/Relu_output_0":
            r.clear()
            r.update(name="/block/relu/Relu_output_0", dtype="FLOAT", bw=16, enc_type="PER_TENSOR")
    sim = rq.QuantSim(model, dummy)
    sim.load_encodings(v1, onnx_model=os.path.join(DATA, "v1/net.onnx"))
    assert sim.quantizer("block.relu.output").precision() == ("float", 16, "fp16")


def test_an_unknown_file_gets_a_clear_error():
    model, dummy, _ = _fixture()
    with pytest.raises(ValueError, match="unrecognised encodings file"):
        rq.QuantSim(model, dummy).load_encodings({"hello": 1})

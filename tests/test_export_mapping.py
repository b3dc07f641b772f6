"""The exported graph, walked: every enabled quantizer owns its QuantizeLinear/DequantizeLinear
pair, each Q node carries exactly its quantizer's encoding, quantizes the tensor the sim's
quantizer sees, and every encodings file (ours, AIMET 1.0.0, 2.0.0) names that tensor.
Every export loads in onnxruntime with default session options and with ORT_DISABLE_ALL."""
import copy
import json

import numpy as np
import pytest
import torch

import rapidquant as rq
from _models import ConvNet, MobileNetV2ish, TinyEncoder

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto as T, numpy_helper  # noqa: E402

from rapidquant.export.onnx_qdq import ROLE, TAG, param_of  # noqa: E402
from rapidquant.qmodules import QuantizedModule  # noqa: E402

UNSIGNED = {T.UINT8: 128, T.UINT16: 32768}  # container -> shift of a signed grid
CONTAINER = {T.INT8: (-128, 127), T.UINT8: (0, 255), T.INT16: (-32768, 32767), T.UINT16: (0, 65535)}


def batches(n=3, bs=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, size, size, generator=g) for _ in range(n)]


def meta(node):
    return {p.key: p.value for p in node.metadata_props}


class Graph:
    def __init__(self, path):
        self.model = onnx.load(path)
        g = self.model.graph
        self.nodes = list(g.node)
        self.inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.init_type = {i.name: i.data_type for i in g.initializer}
        self.consumers = {}
        self.producer = {o: n for n in self.nodes for o in n.output}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def const(self, name):
        assert name in self.inits, f"{name} is not an initializer (computed at run time)"
        return self.inits[name]


def walk(res, sim, x):
    """Checks the graph of one export; returns {quantizer: [Q input tensors]}."""
    g = Graph(res.onnx)
    qs = sim.quantizers()
    params = sim.param_quantizers()
    found = {}
    for n in g.nodes:
        md = meta(n)
        if n.op_type == "QuantizeLinear":
            assert md.get(ROLE) == "quantize" and md.get(TAG) in qs, f"orphan QuantizeLinear {n.name}"
        if md.get(ROLE) != "quantize":
            continue
        name = md[TAG]
        q = qs[name]
        assert q.enabled
        found.setdefault(name, []).append(n.input[0])
        if n.op_type == "Cast":  # fp16/bf16 activation: saturate, cast, cast back
            assert q.dtype == "float" and q.float_format in ("fp16", "bf16")
            want = T.FLOAT16 if q.float_format == "fp16" else T.BFLOAT16
            assert [a.i for a in n.attribute if a.name == "to"] == [want]
            continue
        check_q_node(g, n, q, name, is_param=name in params)
    enabled = {n for n, q in qs.items() if q.enabled}
    for name, twin in res.merged.items():  # equal weights and encodings: torch.onnx kept one Q node
        assert qs[name].encoding == qs[twin].encoding and twin in found
        found[name] = list(found[twin])
    assert set(found) | set(res.folded) == enabled, f"unmapped: {sorted(enabled - set(found) - set(res.folded))}"
    assert not res.unmapped
    for name in res.folded:  # an fp16/bf16 weight is folded into its initializer: values already rounded
        assert params[name].float_format in ("fp16", "bf16")
    check_tensors(g, found, sim, x)
    return found


def _codes_in(g, n, qmin, qmax) -> bool:
    """The codes a QuantizeLinear gives its constant input all lie in [qmin, qmax]."""
    w, s, z = g.const(n.input[0]).astype(np.float32), g.const(n.input[1]).astype(np.float32), g.const(n.input[2])
    if {a.name: a.i for a in n.attribute}.get("block_size"):
        return False  # blocked grids show their clamp
    if s.size > 1:
        shape = [1] * w.ndim
        shape[{a.name: a.i for a in n.attribute}.get("axis", 1) % w.ndim] = s.size
        s, z = s.reshape(shape), z.reshape(shape)
    codes = np.rint(w / s) + z.astype(np.float32)
    return bool(codes.min() >= qmin and codes.max() <= qmax)


def check_q_node(g, n, q, name, is_param):
    scale = g.const(n.input[1]).astype(np.float64)
    axis = {a.name: a.i for a in n.attribute}.get("axis")
    block = {a.name: a.i for a in n.attribute}.get("block_size", 0)
    dqs = follow_to_dq(g, n, name)
    if q.dtype == "float":  # fp8: no zero point, the float8 type in output_dtype
        assert len(n.input) == 2
        np.testing.assert_array_equal(scale.reshape(-1), q.scale.double().reshape(-1).numpy())
        return
    ztype = g.init_type[n.input[2]]
    zp = g.const(n.input[2]).astype(np.int64)
    qmin, qmax = q.qrange
    off = UNSIGNED[ztype] if (ztype in UNSIGNED and qmin < 0) else 0
    if is_param:  # signed 8-bit weights of integer kernels travel as uint8 (export/ort_guards.py)
        assert off == 0 or ztype == T.UINT8, "weights keep the grid's signedness, or go into uint8"
    else:
        assert ztype in UNSIGNED, "activations use unsigned containers (onnxruntime default session)"
    lo, hi = CONTAINER[ztype]
    assert lo <= qmin + off and qmax + off <= hi
    want_s = q.scale.detach().double().numpy()
    want_z = q.zero_point.detach().numpy().astype(np.int64)
    if block:  # blocked: the scale is tiled over the dims it is broadcast along
        want_s = np.broadcast_to(want_s, scale.shape)
        want_z = np.broadcast_to(want_z, zp.shape)
        assert axis is not None and scale.shape[axis] * block == g.const(n.input[0]).shape[axis]
    np.testing.assert_array_equal(scale.reshape(-1), want_s.reshape(-1).astype(np.float32))
    np.testing.assert_array_equal(zp.reshape(-1) - off, want_z.reshape(-1))
    if q.axis is not None and not block:
        assert axis == q.axis % len(q.scale.shape)
    narrow = (qmin + off, qmax + off) != (lo, hi)
    for path in dqs:  # Q [-> Clip on the codes] -> DQ [-> float clamp]
        dq = path[-1]
        assert list(dq.input[1:]) == list(n.input[1:]), "DQ uses the Q node's scale and zero point"
        clamps = [c for c in path[1:-1] if c.op_type == "Clip"]
        if narrow and ztype in (T.INT8, T.UINT8):
            assert len(clamps) == 1
            assert int(g.const(clamps[0].input[1])) == qmin + off and int(g.const(clamps[0].input[2])) == qmax + off
        elif narrow and is_param:  # 16-bit container: a float clamp after DQ (torch.onnx may rename it),
            users = g.consumers.get(dq.output[0], [])  # or constant codes that all fit the grid
            fits = n.input[0] in g.inits and _codes_in(g, n, qmin, qmax)
            assert fits or (users and all(u.op_type in ("Clip", "Max", "Min") for u in users)), \
                f"{name}: a {qmin}..{qmax} grid in a 16-bit container needs a clamp after DQ"
        elif narrow:  # activation, 16-bit container: a float clamp in front of Q
            assert g.producer[n.input[0]].op_type in ("Clip", "Min"), f"{name}: no clamp in front of Q"
        else:
            assert not clamps


def follow_to_dq(g, q_node, name):
    paths = []
    for u in g.consumers.get(q_node.output[0], []):
        path = [q_node, u]
        while path[-1].op_type == "Clip":
            nxt = g.consumers.get(path[-1].output[0], [])
            assert len(nxt) == 1
            path.append(nxt[0])
        assert path[-1].op_type == "DequantizeLinear", f"{name}: Q feeds {path[-1].op_type}"
        assert all(meta(p).get(TAG) == name for p in path), f"{name}: its Q/clamp/DQ carry another name"
        paths.append(path)
    assert paths, f"{name}: QuantizeLinear without DequantizeLinear"
    return paths


def check_tensors(g, found, sim, x):
    """Each Q node quantizes the tensor the sim's quantizer quantizes: a weight's Q input is
    the module's parameter itself; an activation's DQ output equals, in onnxruntime
    (ORT_DISABLE_ALL), the sim quantizer's output (a float kernel may round a value onto the
    neighbouring step, so at most one step and a few elements may differ)."""
    qs = sim.quantizers()
    params = sim.param_quantizers()
    for n, ts in found.items():
        if n in params:  # (eval mode serves cached quantized weights, so read the parameter itself)
            w = param_of(sim, n).detach().numpy()
            for t in ts:
                np.testing.assert_array_equal(g.const(t), w, err_msg=n)
    seen = {}
    hooks = [q.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, o.detach().clone()))
             for n, q in qs.items() if q.enabled and n not in params]
    try:
        with torch.no_grad():
            sim.model(*(x if isinstance(x, tuple) else (x,)))
    finally:
        for h in hooks:
            h.remove()
    out_of = {}  # activation quantizer -> the tensor after its DQ (fp16/bf16: after the cast back)
    for node in g.nodes:
        md = meta(node)
        if md.get(TAG) in seen and md.get(ROLE) == "quantize":
            after = follow_to_dq(g, node, md[TAG])[0][-1] if node.op_type == "QuantizeLinear" else \
                g.consumers[node.output[0]][0]
            out_of[md[TAG]] = after.output[0]
    assert set(out_of) == set(seen) & set(found)
    model = copy.deepcopy(g.model)
    have = {o.name for o in model.graph.output}
    for t in out_of.values():
        if t not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
            have.add(t)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    xs = x if isinstance(x, tuple) else (x,)
    outs = dict(zip([o.name for o in sess.get_outputs()],
                    sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), xs)})))
    for n, t in out_of.items():
        want, got = seen[n].float().numpy(), outs[t]
        q = qs[n]
        step = float(q.scale.max()) if q.scale is not None else np.abs(want).max() * 2 ** -7
        # a value that float kernels round onto the neighbouring step upstream can move a few
        # steps downstream; a wrong tensor (e.g. before a Relu) differs in far more places
        assert np.abs(got - want).max() <= 4 * step * 1.001, n
        assert np.mean(got != want) <= 0.05 or np.abs(got - want).max() <= step * 1.001, n


def check_files(tmp_path, sim, x, found):
    """The three encodings formats name the same tensors for every mapped quantizer."""
    names = {}
    for fmt in ("rapidquant", "1.0.0", "2.0.0"):
        res = sim.export(str(tmp_path / fmt), x, encoding_format=fmt)
        doc = json.load(open(res.encodings))
        if fmt == "rapidquant":
            names[fmt] = {n: r.get("onnx_tensors", [r["onnx_tensor"]]) for n, r in doc["quantizers"].items()
                          if "onnx_tensor" in r}
        else:
            t2q = doc["rapidquant"]["tensor_to_quantizer"]
            recs = (doc["activation_encodings"] + doc["param_encodings"]) if fmt == "1.0.0" else doc["encodings"]
            keyed = {r["name"] for r in recs}
            m = {}
            for t, ns in t2q.items():
                assert t in keyed, f"{fmt}: no record for {t} ({ns})"
                for n in ([ns] if isinstance(ns, str) else ns):
                    m.setdefault(n, []).append(t)
            names[fmt] = m
        assert {n: sorted(v) for n, v in names[fmt].items()} == {n: sorted(v) for n, v in found.items()}, fmt


def export_and_walk(tmp_path, sim, x, **kw):
    res = sim.export(str(tmp_path), x, **kw)
    assert not res.ort_errors, res.ort_errors
    assert set(res.parity) == {"default", "disable_all"}
    return res, walk(res, sim, x)


def sim_for(model, x, cfg, data=None):
    sim = rq.QuantSim(model.eval(), x, cfg)
    sim.compute_encodings(data or batches(size=x.shape[-1]), show_progress=False)
    return sim


# ----------------------------------------------------------------------------- configurations
@pytest.mark.parametrize("bw", range(2, 17))
def test_int_per_tensor_every_bitwidth(tmp_path, bw):
    """Weights and activations at every integer bitwidth, per tensor; the model has a Reshape
    after an activation QDQ (onnxruntime's default session once refused < 8-bit activations)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    sim = sim_for(ConvNet(), x, rq.QuantSimConfig(param_bw=bw, act_bw=bw, per_channel=False))
    export_and_walk(tmp_path, sim, x)


@pytest.mark.parametrize("bw", [2, 4, 8, 12, 16])
def test_signed_activations(tmp_path, bw):
    """Symmetric signed activation grids go into uint8/uint16 with a shifted zero point."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    sim = sim_for(ConvNet(), x, rq.QuantSimConfig(param_bw=8, act_bw=bw, act_symmetric=True,
                                                   hw_config={"defaults": {"ops": {"is_output_quantized": "True",
                                                                                   "is_symmetric": "True"},
                                                                           "params": {"is_quantized": "True",
                                                                                      "is_symmetric": "True"},
                                                                           "strict_symmetric": "False",
                                                                           "unsigned_symmetric": "False",
                                                                           "per_channel_quantization": "True"}}))
    assert any(q.qrange[0] < 0 for q in sim.activation_quantizers().values())
    export_and_walk(tmp_path, sim, x)


@pytest.mark.parametrize("bw", [3, 8, 12])
def test_per_channel(tmp_path, bw):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    sim = sim_for(MobileNetV2ish(), x, rq.QuantSimConfig(param_bw=bw, act_bw=8, per_channel=True))
    assert any(q.axis is not None for q in sim.param_quantizers().values())
    export_and_walk(tmp_path, sim, x)


@pytest.mark.parametrize("bw", [4, 8, 12])
def test_per_block(tmp_path, bw):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    sim = sim_for(MobileNetV2ish(), x, rq.QuantSimConfig(param_bw=bw, act_bw=8, block_size=8))
    assert any(q.block_size is not None for q in sim.param_quantizers().values())
    export_and_walk(tmp_path, sim, x)


@pytest.mark.parametrize("cfg", [dict(dtype="float", param_bw=16, act_bw=16),
                                 dict(dtype="float", param_bw=16, act_bw=16, float_format="bf16"),
                                 dict(act_dtype="float", param_bw=8, act_bw=8, float_format="fp8_e4m3"),
                                 dict(act_dtype="float", param_bw=8, act_bw=8, float_format="fp8_e5m2")],
                         ids=["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"])
def test_float_formats(tmp_path, cfg):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    sim = sim_for(ConvNet(), x, rq.QuantSimConfig(**cfg))
    res, _ = export_and_walk(tmp_path, sim, x)
    if cfg.get("act_dtype") == "float":  # the fp8 Relu->Q case onnxruntime once rewrote
        assert res.parity["default"].max_abs_diff == res.parity["disable_all"].max_abs_diff == 0.0


def test_narrow_grids_after_cle_and_encodings_files(tmp_path):
    """W4 per-tensor after CLE (ReLU6 -> per-channel clip): the case where a weight clamp was
    fused into one Clip and the old matcher gave a layer's output encoding to the weight."""
    from rapidquant.techniques.cle import equalize_
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    m = MobileNetV2ish().eval()
    equalize_(m)
    sim = sim_for(m, x, rq.QuantSimConfig(param_bw=4, act_bw=4, per_channel=False))
    res, found = export_and_walk(tmp_path / "model", sim, x)
    check_files(tmp_path, sim, x, found)


def test_mixed_precision_frozen_weights_and_int32_bias(tmp_path):
    """Different bitwidths per quantizer (what AMP leaves), an AdaRound-like frozen weight
    encoding set by hand, fp16 on one activation, and int32 biases embedded in the graph."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    sim = sim_for(MobileNetV2ish(), x, rq.QuantSimConfig(param_bw=8, act_bw=8, per_channel=True))
    names = list(sim.quantizers())
    for i, (n, q) in enumerate(sim.quantizers().items()):
        if i % 3 == 1:
            q.bitwidth = (4, 6, 16)[i % 3 + (i // 3) % 2]
            q.compute_encoding()
    w = sim.quantizer("stem.0.weight")
    w.set_encoding(w.scale * 1.5, w.zero_point)
    w.frozen = True
    sim.quantizer(names[-2]).set_dtype("float", 16, "fp16")
    res, found = export_and_walk(tmp_path / "m", sim, x)
    assert len({q.bitwidth for q in sim.quantizers().values()}) >= 3
    g = Graph(res.onnx)
    q_node = [n for n in g.nodes if meta(n).get(TAG) == "stem.0.weight" and n.op_type == "QuantizeLinear"][0]
    np.testing.assert_array_equal(g.const(q_node.input[1]).reshape(-1), w.scale.reshape(-1).numpy())
    bias = json.load(open(res.encodings))["int32_bias"]
    embedded = {n.output[0][:-len("_dq")]: n for n in g.nodes
                if n.op_type == "DequantizeLinear" and g.init_type.get(n.input[0]) == T.INT32}
    # every layer whose bias the sim runs as int32 has it in the graph, listed in the file
    want = {f"{name}.module.bias" for name, m in sim.model.named_modules()
            if isinstance(m, QuantizedModule) and m.bias_grid() is not None}
    assert want and set(embedded) == want and want <= set(bias)
    for t, dq in embedded.items():  # the int32 DQ in the graph uses the recorded scale
        np.testing.assert_array_equal(g.const(dq.input[1]).reshape(-1), np.float32(bias[t]["scale"]))
    check_files(tmp_path, sim, x, found)


def test_transformer(tmp_path):
    """MultiheadAttention, LayerNorm, GELU and hand-written matmul attention (weights through
    Transpose/Reshape) at W4A8 and W8A4."""
    torch.manual_seed(0)
    tok = torch.randint(0, 50, (4, 12))
    data = [torch.randint(0, 50, (4, 12)) for _ in range(3)]
    for pbw, abw in ((4, 8), (8, 4)):
        sim = sim_for(TinyEncoder(), tok, rq.QuantSimConfig(param_bw=pbw, act_bw=abw), data)
        export_and_walk(tmp_path / f"w{pbw}a{abw}", sim, tok)


def test_walk_catches_a_wrong_encoding(tmp_path):
    """The walk fails when a Q node carries another encoding than its quantizer's."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    sim = sim_for(ConvNet(), x, rq.QuantSimConfig(param_bw=4, act_bw=4, per_channel=False))
    res = sim.export(str(tmp_path), x)
    q = sim.quantizer("conv2.weight")
    q.set_encoding(q.scale * 2, q.zero_point)  # the sim changes after the export
    with pytest.raises(AssertionError):
        walk(res, sim, x)


class DeadBranch(torch.nn.Module):
    """A layer whose result no output uses (the exporter removes it)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

    def forward(self, x):
        torch.sigmoid(self.b(x))
        return self.a(x)


def test_quantizers_of_a_removed_branch_are_named_with_why(tmp_path):
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    sim = rq.QuantSim(DeadBranch().eval(), x)
    sim.compute_encodings([x], show_progress=False)
    with pytest.warns(UserWarning, match="no model output uses it") as record:
        res = sim.export(str(tmp_path), x)
    assert sorted(res.unmapped) == ["b.output", "b.weight", "sigmoid.output"] and res.ort_ok
    assert not any("never called" in str(w.message) for w in record)  # it ran; the exporter dropped it
    doc = json.load(open(res.encodings))["quantizers"]
    assert all("onnx_tensor" not in doc[n] for n in res.unmapped) and doc["a.output"]["onnx_tensor"]


def test_no_initializer_is_left_unread(tmp_path):
    """The float biases the int32 ones replace leave the file: onnxruntime warns once per
    unread initializer on every load."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    sim = sim_for(ConvNet(), x, rq.QuantSimConfig())
    res = sim.export(str(tmp_path), x)
    assert res.ort_ok and json.load(open(res.encodings))["int32_bias"]
    g = onnx.load(res.onnx).graph
    read = {i for n in g.node for i in n.input}
    assert [t.name for t in g.initializer if t.name not in read] == []


def test_fp16_model_exports_a_file_onnxruntime_runs(tmp_path):
    """ONNX's QuantizeLinear takes x and its scale in one type, and an fp16 scale would move the
    grid: an fp16 tensor is quantized in fp32 with the sim's fp32 scales and cast back, as the
    sim computes it. The file loads and agrees with the sim."""
    m = torch.nn.Sequential(torch.nn.Conv1d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv1d(8, 4, 1)).half()
    x = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(0))
    sim = rq.QuantSim(m.eval(), x)
    sim.compute_encodings([x], show_progress=False)
    res = sim.export(str(tmp_path), x)
    sess = ort.InferenceSession(res.onnx)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.half().numpy()})
    with torch.no_grad():
        want = sim.model(x.half())
    assert got.dtype == np.float16
    step = float(sim.quantizer(sorted(n for n in sim.quantizers() if n.endswith(".output"))[-1]).scale)
    # fp16 rounding of the dequantized output: measured 0 steps apart (asserted within one)
    assert np.abs(got.astype(np.float32) - want.float().numpy()).max() <= step, step
    assert res.ort_ok and res.parity["default"].max_steps is not None  # the output grid is found through the Cast
    fp8 = rq.QuantSim(m.eval(), x, rq.QuantSimConfig(act_dtype="float", float_format="fp8_e4m3"))
    fp8.compute_encodings([x], show_progress=False)
    assert fp8.export(str(tmp_path / "fp8"), x).ort_ok  # fp8 activations of an fp16 model: the same cast


def _sequence_net():
    return torch.nn.Sequential(torch.nn.Conv1d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv1d(8, 2, 1)).eval()


def test_dims_calibration_saw_at_several_sizes_stay_free_in_the_file(tmp_path, monkeypatch):
    """A time axis the calibration batches vary is exported symbolic with the batch; one they
    do not vary is symbolic when named in dynamic_dims; one the model's code fixes is named."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 4, n, generator=g) for n in (50, 70, 90)]
    sim = rq.QuantSim(_sequence_net(), batches[0])
    sim.compute_encodings(batches, show_progress=False)
    name = sim.input_signature.names[0]
    assert sim.varying_dims() == {name: [2]}
    other = torch.randn(1, 4, 123, generator=g)  # another batch size and length

    def run(path):
        sess = ort.InferenceSession(path)
        return sess.run(None, {sess.get_inputs()[0].name: other.numpy()})[0]
    got = run(sim.export(str(tmp_path / "a"), batches[0]).onnx)
    with torch.no_grad():
        assert np.abs(got - sim.model(other).numpy()).max() < 1e-5

    fixed = rq.QuantSim(_sequence_net(), batches[0])
    fixed.compute_encodings([batches[0]] * 2, show_progress=False)
    assert fixed.varying_dims() == {}
    with pytest.raises(Exception, match="[Ii]nvalid dimensions|[Gg]ot: 123"):
        run(fixed.export(str(tmp_path / "b"), batches[0]).onnx)
    assert run(fixed.export(str(tmp_path / "c"), batches[0], dynamic_dims={name: [2]}).onnx).shape == (1, 2, 123)
    with pytest.raises(ValueError, match="not inputs of the captured model"):
        fixed.export(str(tmp_path / "d"), batches[0], dynamic_dims={"audio": [2]})

    static = sim.export(str(tmp_path / "s"), batches[0], dynamic_batch=False).onnx  # static: what was asked
    assert [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(static).graph.input] == [[2, 4, 50]]
    # a model whose export cannot keep the length free (simulated: the exporter refuses it) keeps
    # its batch free, and the warning names the length the file fixes
    real = torch.onnx.export

    def refuses_length(*a, dynamic_shapes=None, **k):
        if dynamic_shapes and any(d and 2 in d for d in dynamic_shapes):
            raise RuntimeError("Constraints violated (simulated)")
        return real(*a, dynamic_shapes=dynamic_shapes, **k)
    monkeypatch.setattr(torch.onnx, "export", refuses_length)
    with pytest.warns(UserWarning, match=rf"fixes input sizes that were to stay free: {name} dim 2 = 50"):
        path = sim.export(str(tmp_path / "e"), batches[0]).onnx
    (dims,) = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(path).graph.input]
    assert isinstance(dims[0], str) and dims[1:] == [4, 50]


class _Ramp(torch.nn.Module):
    """Branches on values (no capture follows it: a float leaf) and reads the length as a
    number: its recorded graph holds a ramp of that length."""

    def forward(self, x):
        ramp = torch.arange(x.shape[-1], dtype=x.dtype) / x.shape[-1]
        return x * ramp if bool(x.abs().sum() > 0) else x


class _PerRow(torch.nn.Module):
    """A float leaf that reads the batch size as a number (and not the length)."""

    def forward(self, x):
        rows = torch.arange(x.shape[0], dtype=x.dtype).reshape(-1, 1, 1)
        return x + rows if bool(x.abs().sum() > 0) else x


def test_a_float_leaf_that_reads_a_size_keeps_only_that_size_fixed(tmp_path):
    """Each dim the file is to keep free is checked against the float leaves' recordings: a
    leaf that reads the length as a number keeps the length fixed (said, with the leaf) where
    a free length would compute wrong shapes; a leaf that reads only the batch keeps the batch
    fixed and the length free."""
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 4, n, generator=g) for n in (50, 70)]

    def net(leaf):
        return torch.nn.Sequential(torch.nn.Conv1d(4, 4, 1), leaf, torch.nn.Conv1d(4, 2, 1)).eval()

    def shape(path):
        (i,) = onnx.load(path).graph.input
        return [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]

    ramp = rq.QuantSim(net(_Ramp()), batches[0])
    assert set(ramp.float_leaves) == {"1"}
    ramp.compute_encodings(batches, show_progress=False)
    with pytest.warns(UserWarning, match=r"dim 2 = 50 \(calibration saw \[50, 70\]\) \(read as a number by the "
                                         r"float leaves \['1\.module'\]\)"):
        res = ramp.export(str(tmp_path / "a"), batches[0])
    dims = shape(res.onnx)
    assert isinstance(dims[0], str) and dims[1:] == [4, 50]  # the batch stays free
    sess = ort.InferenceSession(res.onnx)
    one = batches[0][:1]
    with torch.no_grad():
        want = ramp.model(one).numpy()
    assert np.abs(sess.run(None, {sess.get_inputs()[0].name: one.numpy()})[0] - want).max() < 1e-5

    rows = rq.QuantSim(net(_PerRow()), batches[0])
    rows.compute_encodings(batches, show_progress=False)
    with pytest.warns(UserWarning, match="read the batch size as a number"):
        res = rows.export(str(tmp_path / "b"), batches[0])
    dims = shape(res.onnx)
    assert dims[:2] == [2, 4] and isinstance(dims[2], str)  # the length stays free
    sess = ort.InferenceSession(res.onnx)
    longer = torch.randn(2, 4, 90, generator=g)
    with torch.no_grad():
        want = rows.model(longer).numpy()
    assert np.abs(sess.run(None, {sess.get_inputs()[0].name: longer.numpy()})[0] - want).max() < 1e-5


class _Tokens(torch.nn.Module):
    """Token ids -> embedding -> a float leaf that reads the sequence length as a number."""

    def __init__(self):
        super().__init__()
        self.emb, self.ramp, self.out = torch.nn.Embedding(30, 8), _Ramp(), torch.nn.Linear(8, 2)

    def forward(self, ids):
        return self.out(self.ramp(self.emb(ids).transpose(1, 2)).transpose(1, 2))


def test_an_integer_input_dim_a_float_leaf_reads_stays_fixed(tmp_path):
    """Every dim of an integer input (token ids) goes symbolic with the batch, but not one a
    float leaf reads as a number: that one stays fixed, and the warning names it."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 30, (2, n), generator=g) for n in (12, 20)]
    sim = rq.QuantSim(_Tokens().eval(), batches[0])
    sim.compute_encodings(batches, show_progress=False)
    with pytest.warns(UserWarning, match=r"dim 1 = 12 \(calibration saw \[12, 20\]\) \(read as a number"):
        res = sim.export(str(tmp_path), batches[0])
    (i,) = onnx.load(res.onnx).graph.input
    dims = [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 12


@pytest.mark.parametrize("per_channel", [False, True])
def test_named_qdq_traces_no_parameter_reshapes(per_channel):
    """Under export the quantizers hand their one-dim scale and zero point to the named op as
    they are: the traced graph has no reshape of them (two per quantizer before, 300 of
    MiniLM's 1,050 nodes, which torch.onnx decomposes, translates and folds one by one)."""
    from rapidquant.ops import named
    from rapidquant.qmodules import float_biases
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    sim = sim_for(MobileNetV2ish(), x, rq.QuantSimConfig(param_bw=8, act_bw=8, per_channel=per_channel))
    assert len(sim.quantizers()) > 10

    def reshapes(model):
        ep = torch.export.export(model.eval(), (x,))
        return sum(n.op == "call_function" and ("reshape" in str(n.target) or "view" in str(n.target))
                   for n in ep.graph.nodes)
    with float_biases(), named.carrying_names():  # as export_sim traces (int32 biases go in after)
        got = reshapes(sim.model)
    assert got == reshapes(MobileNetV2ish())


def test_named_qdq_runs_eagerly_on_one_dim_parameters():
    """The named op's own kernel (outside tracing) takes the one-dim parameters too, and
    computes the plain op's values."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5)
    s, z = torch.rand(6) * 0.05 + 0.01, torch.randint(-4, 4, (6,)).float()
    got = torch.ops.rapidquant.named_quantize_dequantize(x, s, z, -128, 127, [0, 1, 0, 0], "q")
    assert torch.equal(got, rq.ops.quantize_dequantize(x, s, z, -128, 127, axis=1))
    got = torch.ops.rapidquant.named_quantize_dequantize(x, s[:1].reshape(()), z[:1].reshape(()), -128, 127,
                                                         [0, 0, 0, 0], "q")
    assert torch.equal(got, rq.ops.quantize_dequantize(x, s[0], z[0], -128, 127))

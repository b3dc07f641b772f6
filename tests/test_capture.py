"""Graph capture: torch.fx / torch.export, keyword inputs and dataclass outputs, weights used by
functional ops, constant arguments, exact attention masks, grid-damage warnings."""
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rapidquant as rq
from rapidquant.batches import call_model
from _models import Prototypes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class SameConv(nn.Conv2d):
    """TF-style 'same' padding, as in EfficientNet ports: its own forward calls F.conv2d."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class EffNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SameConv(3, 8, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = SameConv(8, 8, 3, groups=8)
        self.pw = SameConv(8, 16, 1)
        self.head = nn.Parameter(torch.randn(16, 10) * 0.1)  # raw parameter: x @ self.head

    def forward(self, x):
        x = F.relu6(self.bn(self.stem(x)))
        x = self.pw(F.relu6(self.dw(x)))
        return x.mean((2, 3)) @ self.head


def _imgs(n=3, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, 16, 16, generator=g) for _ in range(n)]


@pytest.mark.parametrize("method", ["fx", "export"])
def test_conv_subclass_and_raw_parameter_weights_are_quantized(method, tmp_path):
    torch.manual_seed(0)
    model = EffNetish().eval()
    sim = rq.QuantSim(model, torch.randn(1, 3, 16, 16), rq.QuantSimConfig(capture=method))
    assert sim.capture_method == {"fx": "torch.fx", "export": "torch.export"}[method]
    pq = sim.param_quantizers()
    # every weight that feeds a conv or a matmul, whatever module holds it
    assert {"stem.weight", "dw.weight", "pw.weight", "head"} <= set(pq)
    assert all(pq[n].axis == 0 for n in ("stem.weight", "dw.weight", "pw.weight"))  # per-channel preset
    sim.compute_encodings(_imgs(), show_progress=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for name in ("stem.weight", "pw.weight", "head"):
            with sim.disabled(lambda q: q.name != name):  # only that weight quantized: the output moves
                assert not torch.equal(sim.model(x), model(x)), name
    res = sim.export(str(tmp_path), x)
    assert res.ort_ok and not res.unmapped  # every weight quantizer has its QDQ node
    # measured: bit-exact without graph optimizations, one output step (10% of outputs) with them
    assert res.parity["disable_all"].max_steps == 0 and res.parity["default"].max_steps <= 1.001, res.parity


def test_concrete_args_are_constants_not_inputs():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x, double=True, bias=None):
            y = self.l(x)
            if double:
                y = y * 2
            return y if bias is None else y + bias

    model = M().eval()
    sim = rq.QuantSim(model, torch.randn(2, 4), concrete_args={"double": False, "bias": None})
    assert sim.input_signature.names == ("x",)
    assert [n for n in sim.quantizers() if n.startswith("input_")] == ["input_x.output"]
    sim.compute_encodings([torch.randn(8, 4)], show_progress=False)  # used to raise: 'bool' has no 'detach'
    x = torch.randn(3, 4)
    with torch.no_grad(), sim.disabled():
        assert torch.equal(sim.model(x), model(x, double=False))


@dataclass
class Out:
    logits: torch.Tensor
    hidden: torch.Tensor


class KwModel(nn.Module):
    """Keyword inputs (ids, float mask) and a dataclass output, like a transformers model."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.cls = nn.Linear(16, 3)

    def forward(self, input_ids=None, attention_mask=None, return_hidden=True):
        h = self.proj(self.emb(input_ids))
        scores = h @ h.transpose(1, 2) / 4.0
        scores = scores + (1.0 - attention_mask[:, None, :].float()) * torch.finfo(torch.float32).min
        h = torch.softmax(scores, -1) @ h
        return Out(self.cls(h.mean(1)), h)


def _tok(bs, t, seed, pad=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (bs, t), generator=g)
    mask = torch.ones(bs, t, dtype=torch.long)
    if pad:
        mask[:, -pad:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("method", ["fx", "export"])
def test_keyword_inputs_dict_batches_and_dataclass_outputs(method):
    model = KwModel().eval()
    dummy = {k: v for k, v in _tok(2, 6, 0).items() if k != "token_type_ids"}
    sim = rq.QuantSim(model, dummy, rq.QuantSimConfig(capture=method))
    assert sim.input_signature.names == ("input_ids", "attention_mask") and sim.n_inputs == 2
    # calibration batches are the tokenizer's dicts, with a key the sim was not captured with
    sim.compute_encodings([_tok(4, 6, s, pad=s) for s in range(3)], show_progress=False)
    out = sim.run(_tok(3, 6, 9, pad=2))
    assert isinstance(out, Out) and out.logits.shape == (3, 3)
    args_kwargs = ((dummy["input_ids"],), {"attention_mask": dummy["attention_mask"]})
    with torch.no_grad(), sim.disabled():
        assert torch.equal(call_model(sim.model, args_kwargs).logits, model(**dummy).logits)
    assert sim.positional(_tok(3, 6, 9))[1].shape == (3, 6)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_attention_mask_stays_exact(method):
    """Padded tokens' contents cannot change a quantized sim's output at the real tokens
    when the mask path (integer mask -> dtype-min additive mask -> add) is not quantized."""
    torch.manual_seed(0)
    model = KwModel().eval()
    dummy = {k: v for k, v in _tok(2, 6, 0, pad=2).items() if k != "token_type_ids"}
    sim = rq.QuantSim(model, dummy, rq.QuantSimConfig(capture=method))
    sim.compute_encodings([{k: v for k, v in _tok(4, 6, s, pad=2).items()} for s in range(3)], show_progress=False)
    names = set(sim.quantizers())
    assert any("softmax" in n for n in names)  # the softmax after the mask is quantized
    a = _tok(3, 6, 5, pad=2)
    b = {k: v.clone() for k, v in a.items()}
    b["input_ids"][:, -2:] = (b["input_ids"][:, -2:] + 7) % 49 + 1
    with torch.no_grad():
        ha, hb = sim.run(a).hidden[:, :4], sim.run(b).hidden[:, :4]
        ref = model(**{k: a[k] for k in ("input_ids", "attention_mask")}).hidden[:, :4]
    assert torch.equal(ha, hb)
    # measured relative error 0.023; 0.59 when the masked scores get a quantizer (scores round to 0)
    assert (ha - ref).norm() / ref.norm() < 0.1


def test_export_captures_what_fx_cannot():
    class ShapeBranch(nn.Module):  # Python-side shape logic (audio front ends): fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 3)

        def forward(self, x):
            if x.shape[-1] % 2:
                x = F.pad(x, (0, 1))
            return self.conv(x).relu()

    sim = rq.QuantSim(ShapeBranch().eval(), torch.randn(1, 2, 9))
    assert sim.capture_method == "torch.export" and not sim.float_leaves
    assert "torch.fx failed" in sim.capture_notes[0] and "control flow" in sim.capture_notes[0]
    assert {"conv.weight", "input_x.output"} <= set(sim.quantizers())  # module names kept
    sim.compute_encodings([torch.randn(4, 2, 9), torch.randn(4, 2, 13)], show_progress=False)  # any batch, length
    assert sim.run(torch.randn(3, 2, 11)).shape == (3, 4, 10)
    with pytest.raises(Exception, match="(?i)guard|expected"):  # the branch taken at capture: odd lengths
        sim.run(torch.randn(3, 2, 12))
    assert "torch.export" in repr(sim)


def test_sizes_torch_export_fixes_are_named():
    """A loop over an input's first dimension: torch.export fixes that size (and guards it).
    The build says so, sim.fixed_input_sizes lists it, and a calibration batch of another
    size gets an error naming the sizes (was: a bare 'Guard failed: x.size()[0] == 5')."""
    class PointSum(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, points):
            acc = points[0]
            for i in range(1, points.shape[0]):
                acc = acc + points[i]
            return self.fc(acc)

    with pytest.warns(UserWarning, match=r"fixed it to the dummy input's size: points: 5"):
        sim = rq.QuantSim(PointSum().eval(), torch.randn(5, 4))
    assert sim.capture_method == "torch.export" and sim.fixed_input_sizes["points"][0] == 5
    with pytest.raises(ValueError, match=r"points: dim 0 = 5"):
        sim.compute_encodings([torch.randn(6, 4)], show_progress=False)


    class LenReshape(nn.Module):  # len() needs a Python int: non-strict export fixes it, strict does not
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, points):
            return self.fc(points.reshape(len(points), -1)) * 2

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # kept free: no word about fixed sizes
        sim = rq.QuantSim(LenReshape().eval(), torch.randn(5, 2, 4))
    assert sim.capture_method == "torch.export" and sim.input_signature.names == ("points",)
    assert 0 not in sim.fixed_input_sizes.get("points", {})
    sim.compute_encodings([torch.randn(6, 2, 4), torch.randn(9, 2, 4)], show_progress=False)  # other sizes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a free batch dimension: no word about fixed sizes
        free = rq.QuantSim(nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(5, 4), rq.QuantSimConfig(capture="export"))
    assert free.capture_method == "torch.export" and all(0 not in d for d in free.fixed_input_sizes.values())


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
def test_computed_weights_are_quantized_as_weights(tmp_path):
    """weight_norm / spectral_norm (parametrize, and the older hook-based weight_norm, whose
    modules deepcopy refuses): the sim holds each computed weight as a plain parameter with
    a weight quantizer (was: the parametrization a float leaf, its output an activation grid);
    the user's model keeps its parametrizations."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm
    torch.manual_seed(0)
    m = nn.Sequential(weight_norm(nn.Conv1d(4, 8, 3)), nn.ReLU(), torch.nn.utils.weight_norm(nn.Conv1d(8, 8, 1)),
                      nn.ReLU(), spectral_norm(nn.Linear(6, 5))).eval()
    x = torch.randn(2, 4, 8)
    ref = m(x).detach()  # with autograd on, as after training: the hook's weight is then a non-leaf
    sim = rq.QuantSim(m, x)
    assert sim.baked_weights == ["0.weight", "2.weight", "4.weight"]
    assert set(sim.param_quantizers()) == {"0.weight", "2.weight", "4.weight"} and not sim.float_weights
    assert sim.quantizer("0.weight").axis == 0  # a weight's per-channel grid, not an activation's
    with torch.no_grad(), sim.disabled():
        assert torch.equal(sim.model(x), ref)
    assert parametrize.is_parametrized(m[0]) and parametrize.is_parametrized(m[4]) and hasattr(m[2], "weight_g")
    assert torch.equal(m(x), ref)  # the user's model still runs (its parametrized classes untouched)
    sim.compute_encodings([x, torch.randn(2, 4, 8)], show_progress=False)
    assert sim.export(str(tmp_path), x).ort_ok


@pytest.mark.parametrize("method", ["fx", "export"])
def test_functional_conv1d_glu_and_einsum_are_known_ops(method, tmp_path):
    """F.conv1d with a raw weight, nn.GLU and an einsum reading a parameter (found on a
    conformer and a graph network): quantized outputs and weights, not unknown float ops."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(8, 4, 3) * 0.3)
            self.w2 = nn.Parameter(torch.randn(5, 4) * 0.3)
            self.glu = nn.GLU(1)

        def forward(self, x):
            y = F.adaptive_avg_pool1d(self.glu(F.conv1d(x, self.w1, padding=1)), 1).squeeze(-1)
            return torch.einsum("bi,oi->bo", y, self.w2)

    torch.manual_seed(0)
    x = torch.randn(2, 4, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown ops, no float weights
        sim = rq.QuantSim(Net().eval(), x, rq.QuantSimConfig(capture=method))
    assert set(sim.quantizers()) == {"input_x.output", "w1", "conv1d.output", "glu.output",
                                     "adaptive_avg_pool1d.output", "w2", "einsum.output"}
    sim.compute_encodings([x, torch.randn(2, 4, 10)], show_progress=False)
    res = sim.export(str(tmp_path), x)
    assert res.ort_ok and res.parity["default"].max_steps <= 1.001, res.parity


def test_batches_longer_than_inputs_and_args_kwargs():
    model = nn.Linear(4, 2)
    x = torch.randn(3, 4)
    assert torch.equal(call_model(model, (x, torch.zeros(3)), 1), model(x))  # (x, label)
    assert torch.equal(call_model(model, ((x,), {})), model(x))
    assert torch.equal(call_model(model, {"input": x}), model(x))


def test_quantizer_that_destroys_its_input_is_named_and_raised_to_16_bits():
    class Spec(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 4)

        def forward(self, x):
            return self.l(torch.sqrt(x))  # a magnitude from a power spectrum

    g = torch.Generator().manual_seed(0)
    mel = [torch.exp(torch.randn(16, 8, generator=g) * 2 - 6) for _ in range(3)]  # median ~2.5e-3, max ~3
    model = Spec()
    with torch.no_grad():
        ref = model(mel[0])

    def sqnr(sim):
        with torch.no_grad():
            return float(10 * torch.log10(ref.pow(2).sum() / (ref - sim.model(mel[0])).pow(2).sum()))

    kept = rq.QuantSim(model, mel[0], config=rq.QuantSimConfig(widen_destroyed=None))
    with pytest.warns(UserWarning, match=r"(?s)input_x\.output: the typical value is off by 100%, \d+% round to one"):
        kept.compute_encodings(mel, show_progress=False)
    (w,) = [w for w in kept.calibration_warnings if w["name"] == "input_x.output"]
    assert w["collapsed"] > 0.5 and w["level"] == 0.0 and w["rel_error"] == 1.0, w
    assert kept.quantizer("input_x.output").bitwidth == 8 and kept.widened == {}

    sim = rq.QuantSim(model, mel[0])  # default: raised to 16 bits, said so
    with pytest.warns(UserWarning, match=r"(?s)input_x\.output: .*; raised to 16 bits.*sim\.widened"):
        sim.compute_encodings(mel, show_progress=False)
    assert sim.quantizer("input_x.output").bitwidth == 16 and "input_x.output" in sim.widened
    (w,) = [w for w in sim.calibration_warnings if w["name"] == "input_x.output"]
    assert w["rel_error_after"] < 0.05, w
    # measured: 21.2 dB at 8 bits, 44.1 dB raised (+22.9; asserted +15); the other quantizers
    # (the Linear's output, its weight) stay at 8
    assert sqnr(sim) > sqnr(kept) + 15, (sqnr(kept), sqnr(sim))
    assert all(q.bitwidth == 8 for n, q in sim.quantizers().items() if n != "input_x.output")

    # a 4-bit grid is a precision the user chose: warned about, never raised
    low = rq.QuantSim(model, mel[0], config=rq.QuantSimConfig(act_bw=4))
    with pytest.warns(UserWarning, match="destroy most of their input"):
        low.compute_encodings(mel, show_progress=False)
    assert low.widened == {} and low.quantizer("input_x.output").bitwidth == 4

    # the same model on well-scaled data: nothing to say, nothing raised
    sim = rq.QuantSim(Spec(), mel[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sim.compute_encodings([torch.rand(16, 8, generator=g) + 0.5 for _ in range(3)], show_progress=False)
    assert sim.calibration_warnings == [] and sim.widened == {}


def test_values_the_grid_holds_exactly_are_not_destroyed():
    """A one-hot input (0 and 1 at 8 bits: 1 is level 255 of a 1/255 grid, to fp32's rounding
    of the scale) and a saturated tanh (exactly half a step past a grid whose zero point was
    rounded) are held as well as 8 bits can: no warning, nothing raised to 16 bits."""
    from rapidquant.calibration import grid_damage
    one_hot = torch.tensor([0.0, 1.0] * 50)
    d = grid_damage(one_hot, torch.tensor([1 / 255]), torch.tensor([0]), 0, 255)
    assert d["collapsed"] == 0.0 and d["clipped"] == 0.0, d
    s = torch.tensor([2 / 255])  # [-1, 1] on uint8: zero point 127.5 rounded to 128
    d = grid_damage(torch.tensor([1.0, -1.0, 0.5] * 30), s, torch.tensor([128]), 0, 255)
    assert d["clipped"] == 0.0, d

    g = torch.Generator().manual_seed(0)
    x = F.one_hot(torch.randint(0, 28, (64, 24), generator=g), 28).float()
    model = nn.Sequential(nn.Linear(28, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight.mul_(40)  # the tanh saturates on most values
    sim = rq.QuantSim(model, x[:8])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sim.compute_encodings(list(x.split(8)), show_progress=False)
    assert sim.widened == {} and sim.calibration_warnings == []


def test_weight_matrices_held_as_buffers_are_quantized(tmp_path):
    """onnx2torch keeps the ONNX initializers of MatMul and Einsum as buffers: a float buffer
    an op reads as its weight gets a weight quantizer (held as a frozen parameter of the
    sim's copy) and a QDQ pair in the file; the user's model keeps its buffers. A buffer
    added to the data is no weight. Under inplace=True the buffer stays float and is named."""
    class Converted(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.register_buffer("w", torch.randn(8, 6, generator=g))
            self.register_buffer("proj", torch.randn(6, 3, generator=g))
            self.register_buffer("pos", torch.randn(1, 8, generator=g))

        def forward(self, x):
            return torch.einsum("bi,ij->bj", torch.matmul(x + self.pos, self.w), self.proj)

    model = Converted().eval()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    sim = rq.QuantSim(model, x)
    sim.compute_encodings([x], show_progress=False)
    assert sim.weight_buffers == ["w", "proj"] and sim.float_weights == {}
    assert {"w", "proj"} <= set(sim.param_quantizers()) and "pos" not in sim.param_quantizers()
    assert sorted(n for n, _ in model.named_buffers()) == ["pos", "proj", "w"]  # the user's model
    assert not any(p.requires_grad for p in sim.model.parameters())
    with torch.no_grad():
        qw = sim.quantizer("w")(model.w)
    assert not torch.equal(qw, model.w) and (qw - model.w).abs().max() <= float(qw.abs().max()) / 127
    res = sim.export(str(tmp_path), x)
    assert {"w", "proj"} <= set(res.tensor_names) and res.ort_ok

    with pytest.warns(UserWarning, match=r"leaves 2 weights in float(?s:.*)w \(read by"):
        kept = rq.QuantSim(model, x, inplace=True)
    assert kept.weight_buffers == [] and set(kept.float_weights) == {"w", "proj"}


def test_embedding_bag_is_quantized_and_exported(tmp_path):
    """nn.EmbeddingBag (hashed n-grams summed per word, with per-sample weights) gets a weight
    quantizer and an output grid like nn.Embedding, and the file runs in onnxruntime."""
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(50, 8, mode="sum")
            self.head = nn.Linear(8, 2)

        def forward(self, ids, weights):
            return self.head(self.bag(ids, per_sample_weights=weights))

    g = torch.Generator().manual_seed(0)
    ids, w = torch.randint(0, 50, (6, 5), generator=g), torch.rand(6, 5, generator=g)
    model = Bag().eval()
    sim = rq.QuantSim(model, (ids, w))
    assert "bag.weight" in sim.param_quantizers() and sim.float_leaves == {}
    sim.compute_encodings([(ids, w)], show_progress=False)
    with torch.no_grad():
        ref, got = model(ids, w), sim.model(ids, w)
    assert 0 < (ref - got).abs().max() < 0.05 * ref.abs().max()
    res = sim.export(str(tmp_path), (ids, w))
    assert res.ort_ok and "bag.weight" in res.tensor_names


def test_an_embedding_table_read_by_f_embedding_is_a_weight():
    """F.embedding(ids, self.table) under torch.fx: the table gets a weight grid (aten's
    embedding takes the table first, F.embedding second)."""
    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)))

        def forward(self, ids):
            return F.embedding(ids, self.table).sum(1)

    ids = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(1))
    sim = rq.QuantSim(Lookup(), ids)
    assert sim.capture_method == "torch.fx" and "table" in sim.param_quantizers() and sim.float_weights == {}


def test_a_failed_torch_export_prints_no_graph(capfd, monkeypatch):
    """torch.export prints a failed export's partial graph to stderr; capture falls back and
    says why in one line, so that dump (hundreds of lines on a detector) is dropped."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            y = self.l(x)
            return y * 2 if y.sum() > 0 else y  # data-dependent: neither capture takes it

    with pytest.raises(Exception, match="Branchy|data-dependent|control flow"):
        rq.QuantSim(Branchy(), torch.randn(2, 4))
    err = capfd.readouterr().err
    assert "def forward(self" not in err, err[:2000]
    import contextlib
    import sys
    monkeypatch.setattr(sys.modules["rapidquant.capture"], "without_graph_dumps", contextlib.nullcontext)
    with pytest.raises(Exception, match="Branchy|data-dependent|control flow"):
        rq.QuantSim(Branchy(), torch.randn(2, 4))
    assert "def forward(self" in capfd.readouterr().err  # what torch prints without the filter


def test_destroyed_grids_stay_where_the_hardware_has_no_16_bit_activations():
    import json
    import os
    base = json.load(open(os.path.join(os.path.dirname(rq.__file__), "hw_configs", "default_per_channel.json")))
    base["defaults"]["supported_kernels"] = [{"activation": {"bitwidth": 8, "dtype": "int"},
                                              "param": {"bitwidth": 8, "dtype": "int"}}]
    g = torch.Generator().manual_seed(0)
    mel = [torch.exp(torch.randn(16, 8, generator=g) * 3 - 8) for _ in range(2)]
    sim = rq.QuantSim(nn.Linear(8, 4), mel[0], config=rq.QuantSimConfig(hw_config=base))
    with pytest.warns(UserWarning, match="destroy most of their input"):
        sim.compute_encodings(mel, show_progress=False)
    assert sim.widened == {} and all(q.bitwidth == 8 for q in sim.quantizers().values())


def test_integer_image_scaled_in_the_model_is_quantized_but_mask_arithmetic_is_not():
    class U8(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x.float() / 255)

    sim = rq.QuantSim(U8(), torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8))
    assert "truediv.output" in sim.quantizers()  # the conv's input is on a grid in the export too
    sim = rq.QuantSim(KwModel().eval(), {k: v for k, v in _tok(2, 6, 0).items() if k != "token_type_ids"})
    assert not any(n.startswith(("sub", "rsub", "mul", "float", "add")) for n in sim.quantizers()), list(sim.quantizers())


@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_weight_no_quantizer_reaches_is_named(method):
    """An op QuantSim has no rule for reads a weight matrix: the weight stays float in the sim
    and the file, so QuantSim says which, and through which op, instead of staying silent."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sim = rq.QuantSim(Prototypes().eval(), torch.randn(2, 8), rq.QuantSimConfig(capture=method))
    assert set(sim.param_quantizers()) == {"fc.weight"}
    assert list(sim.float_weights) == ["centers"] and sim.float_weights["centers"].startswith("cdist")
    said = [str(w.message) for w in caught if "weights in float" in str(w.message)]
    assert len(said) == 1 and "centers (read by cdist" in said[0]
    # a weight the user excluded on purpose is not reported
    sim = rq.QuantSim(Prototypes().eval(), torch.randn(2, 8), rq.QuantSimConfig(capture=method, exclude=("centers",)))
    assert not sim.float_weights


def test_parameters_used_as_activations_are_not_called_float_weights():
    """A positional embedding and a class token are added and concatenated, not multiplied:
    their ops' outputs are quantized, and they are not reported as weights left in float."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.randn(1, 1, 8))
            self.pos = nn.Parameter(torch.randn(1, 5, 8))
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
            return self.fc(x)

    for method in ("fx", "export"):
        sim = rq.QuantSim(Tokens().eval(), torch.randn(2, 4, 8), rq.QuantSimConfig(capture=method))
        assert not sim.float_weights, (method, sim.float_weights)


class TensorIndices(nn.Module):
    """Indices read from tensors, as onnx2torch's Slice/Squeeze read ONNX initializers: torch.fx
    stores them as 0-d integer constants; hardsigmoid written with torch.clip, as it writes Clip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        start, end, dim = torch.tensor(1), torch.tensor(5), torch.tensor(3)
        y = self.conv(x)[:, start:end]
        y = y * torch.clip(y * (1 / 6) + 0.5, 0.0, 1.0)
        return self.head(y).mean(3, keepdim=True).squeeze(dim=dim)


def test_integer_tensor_indices_export_and_clip_is_clamp(tmp_path):
    torch.manual_seed(0)
    model = TensorIndices().eval()
    sim = rq.QuantSim(model, _imgs()[0], rq.QuantSimConfig(capture="fx"))
    assert list(sim.spelled_ops.values()) == ["HardSwish"]  # torch.clip is a Clip
    sim.compute_encodings(_imgs(), show_progress=False)
    res = sim.export(str(tmp_path), _imgs(1, seed=4)[0])  # failed: a fake slice bound is data-dependent
    assert res.ort_ok and not res.unmapped
    # measured: 0 steps at both levels
    assert res.parity["default"].max_steps <= 1.001, res.parity


def test_integer_tensor_operands_stay_tensors():
    class MaxIndex(nn.Module):  # torch.maximum takes tensors only: the constant must stay one
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            k = torch.tensor(2)
            best = torch.maximum(y.argmax(1, keepdim=True), k)  # an index no lower than 2
            return y.gather(1, best)

    model = MaxIndex().eval()
    sim = rq.QuantSim(model, _imgs()[0], rq.QuantSimConfig(capture="fx"))  # raised TypeError once
    with torch.no_grad(), sim.disabled():
        x = _imgs(1, seed=3)[0]
        assert torch.equal(sim.model(x), model(x))


class Fill(nn.Module):
    """A module making a tensor from a shape, as onnx2torch's ConstantOfShape does."""

    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.tensor([0.25]), requires_grad=False)

    def forward(self, like):
        return self.value.expand_as(like).clone()


class AnchorHead(nn.Module):
    """A detector head decoding boxes against a grid built from the feature map's size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.fill = Fill()

    def forward(self, x):
        y = self.conv(x)
        h, w = y.shape[2], y.shape[3]
        gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        grid = torch.stack([gx, gy], 0).float()
        grid = grid + self.fill(grid)  # cell centres
        return (y + grid) * 4.0


def test_anchor_grids_from_shapes_are_constants_not_activations():
    torch.manual_seed(0)
    sim = rq.QuantSim(AnchorHead().eval(), _imgs()[0], rq.QuantSimConfig(capture="fx"), leaf_modules=[Fill])
    quantized = {n for n, q in sim.quantizers().items() if n.endswith(".output")}
    # the box arithmetic on activations is quantized; the grid's (float(), + fill, fill) is not
    assert not any(n.startswith(("float", "fill", "add.")) for n in quantized), quantized
    assert {"conv.output", "add_1.output", "mul.output"} <= quantized, quantized
    sim.compute_encodings(_imgs(), show_progress=False)
    assert not sim.widened  # was: the grid's add raised to 16 bits (every value on one level)


def test_integers_computed_from_values_are_activations_not_constants():
    class Greedy(nn.Module):  # a decoder step: the next token is an argmax of the logits
        def __init__(self):
            super().__init__()
            self.fc1, self.emb, self.fc2 = nn.Linear(8, 5), nn.Embedding(5, 8), nn.Linear(8, 3)

        def forward(self, x):
            tok = self.fc1(x).argmax(-1)
            return self.fc2(self.emb(tok) * 2.0 + x)

    torch.manual_seed(0)
    sim = rq.QuantSim(Greedy().eval(), torch.randn(4, 8), rq.QuantSimConfig(capture="fx"))
    # was: the argmax counted as shape arithmetic, the embedding of it as a constant, and the
    # scaled embedding lost its grid (a G2P LSTM decoder's file then drifted from its sim)
    assert {"emb.output", "mul.output"} <= set(sim.quantizers()), list(sim.quantizers())


def test_nested_context_blocks_under_torch_export_keep_their_graphs():
    """``with torch.no_grad(): with torch.autocast(...)`` in a model only torch.export captures:
    the export records a subgraph inside a subgraph, and the capture keeps both (it deleted
    the inner one and the build failed with 'no attribute submod_1')."""
    class Spectral(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            if x.dim() != 2:  # torch.fx cannot follow this: torch.export captures
                raise ValueError("2-D input")
            with torch.no_grad():
                with torch.autocast("cpu", enabled=False):
                    s = x.float().mean(dim=-1, keepdim=True)
            return self.lin(x - s)

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    model = Spectral().eval()
    sim = rq.QuantSim(model, x)
    sim.compute_encodings([x], show_progress=False)
    assert sim.capture_method == "torch.export"
    with torch.no_grad():
        assert (sim.model(x) - model(x)).abs().max() < 0.05


def test_rms_norm_is_quantized_and_exported(tmp_path):
    """nn.RMSNorm (a transformer's or a forecaster's norm) gets an output grid like LayerNorm
    instead of staying a float leaf, and the file matches the sim."""
    import onnxruntime as ort
    model = nn.Sequential(nn.Linear(8, 16), nn.RMSNorm(16), nn.Linear(16, 4)).eval()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    sim = rq.QuantSim(model, x)
    assert sim.float_leaves == {} and "1.output" in sim.quantizers()
    sim.compute_encodings([x], show_progress=False)
    res = sim.export(str(tmp_path), x)
    sess = ort.InferenceSession(res.onnx)
    with torch.no_grad():
        want = sim.model(x).numpy()
    # one output step at most (a float sum on a rounding tie); measured 0
    step = float(sim.quantizer("2.output").scale)
    assert abs(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0] - want).max() <= step + 1e-6


def test_instance_norm_pad_values_and_unfold_export_with_a_free_batch(tmp_path):
    """InstanceNorm has a quantized twin (as a float leaf its recording fixed the batch); a
    pad value held in a one-element tensor (onnx2torch's Pad) is read as a number so the
    export takes it; Tensor.unfold only moves values."""
    import onnxruntime as ort

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.conv = nn.InstanceNorm2d(1), nn.Conv2d(1, 4, 3)
            self.register_buffer("pad_value", torch.tensor(0.5))

        def forward(self, x):
            x = F.pad(self.norm(x), [1, 1, 1, 1], mode="constant", value=self.pad_value)
            return self.conv(x).unfold(3, 4, 4).mean(-1)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unknown op, no float leaf
        sim = rq.QuantSim(Net().eval(), x)
    assert sim.float_leaves == {}
    sim.compute_encodings([x, torch.rand(2, 1, 16, 16, generator=g)], show_progress=False)
    res = sim.export(str(tmp_path), x)
    sess = ort.InferenceSession(res.onnx)
    one = x[:1]
    with torch.no_grad():
        want = sim.model(one).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: one.numpy()})[0]
    assert abs(got - want).max() < 1e-5

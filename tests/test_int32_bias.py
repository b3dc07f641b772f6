"""A Conv/Gemm bias runs as int32 on the step s_input * s_weight; at 16-bit inputs and weights
an ordinary bias needs more than 31 bits there. Calibration widens the weight grid until it
fits (rapidquant.int32_bias), whatever sets the encodings, and says so; a frozen weight
encoding it cannot widen is named.

Measured before the fit: ImageNet MobileNetV2 after BN folding and CLE at W16A16 kept 52%
(per-tensor) and 9% (per-channel) top-1 agreement with float on 256 crops, 6 and 19 layers
clipping their bias; with it 100% (bench/bench_int32_bias.py)."""
import warnings

import pytest
import torch
from torch import nn

import rapidquant as rq
from rapidquant.int32_bias import fit_int32_biases
from rapidquant.qmodules import INT32_BIAS_LIMIT, QuantizedModule
from _models import output_fidelity


def big_bias_net(per_channel_only: bool = False):
    """Conv -> ReLU -> Conv -> Linear with biases far above what 16x16-bit grids hold in int32:
    s_in * s_w is about (4/32767) * (0.3/32767) = 1e-9, so a bias of 10 needs 1e10 > 2**31."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    with torch.no_grad():
        b = torch.full((8,), 10.0)
        if per_channel_only:
            b[::2] = 0.01  # only the odd channels overflow
        m[2].bias.copy_(b)
        m[5].bias.mul_(0).add_(20.0)
    return m


def calibrated(m, **cfg):
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 6, 6, generator=g) for _ in range(3)]
    sim = rq.QuantSim(m, batches[0], rq.QuantSimConfig(param_bw=16, act_bw=16, **cfg))
    sim.compute_encodings(batches, show_progress=False)
    return sim, batches


def worst(sim) -> float:
    """max |b / step| / INT32_BIAS_LIMIT over the layers with an int32 bias (above 1: clipped)."""
    out = 0.0
    for m in sim.model.modules():
        if isinstance(m, QuantizedModule) and m.bias_grid() is not None:
            out = max(out, float((m.module.bias.detach().abs() / m.bias_grid()).max()) / INT32_BIAS_LIMIT)
    return out


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_grid_widens_until_the_bias_fits(per_channel, tmp_path):
    m = big_bias_net(per_channel_only=per_channel)
    with pytest.warns(UserWarning, match=r"biases need more than int32.*widened until the bias fits"):
        sim, batches = calibrated(m, per_channel=per_channel)
    fits = sim.bias_fits
    assert {f.layer for f in fits.values()} == {"2", "5"}, fits
    assert 0.99 < worst(sim) <= 1.0  # widened just enough
    conv = fits["2.weight"]
    if per_channel:  # only the overflowing channels give up resolution
        kept = conv.base.reshape(-1)[::2]
        assert torch.equal(conv.scale.reshape(-1)[::2], kept)
        assert (conv.scale.reshape(-1)[1::2] > conv.base.reshape(-1)[1::2]).all()
    assert "coarser so the int32 bias fits" in conv.why()
    # the sim follows float closely: measured relative output error 1.6e-4 per-tensor, 1.2e-4
    # per-channel; with the biases clipped (37x over int32) 0.97. Bound: 6x the larger figure
    with torch.no_grad():
        err = max(float((sim.model(x) - m(x)).norm() / m(x).norm()) for x in batches)
    assert err < 1e-3, err
    # and the file computes what the sim computes, with nothing left saturated
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        res = sim.export(str(tmp_path), batches[0])
    assert res.ort_ok and res.parity["default"].max_steps <= 1.001, res.parity


def test_fit_follows_precision_changes_whatever_their_order():
    """Going to 8-bit inputs gives the weight its own grid back; returning to 16 bits gives the
    same widened grid as before, bit for bit (AMP relies on this: its scores are cached by
    configuration)."""
    with pytest.warns(UserWarning, match="widened"):
        sim, _ = calibrated(big_bias_net())
    qw, qin = sim.quantizer("2.weight"), sim.quantizer("1.output")
    widened, base = qw.scale.clone(), sim.bias_fits["2.weight"].base.clone()
    qin.set_precision("int", 8)
    fit_int32_biases(sim)
    assert torch.equal(qw.scale, base) and "2.weight" not in sim.bias_fits
    qin.set_precision("int", 16)
    fit_int32_biases(sim)
    fit_int32_biases(sim)  # idempotent
    assert torch.equal(qw.scale, widened) and sim.bias_fits["2.weight"].factor > 1
    qin.enabled = False  # no int32 bias without a quantized input: the own grid back
    fit_int32_biases(sim)
    assert torch.equal(qw.scale, base) and "2.weight" not in sim.bias_fits


def test_mixed_precision_configurations_get_their_fit():
    """AMP applies configurations through the kept statistics and a snapshot that holds the
    widened scales; each configuration gets its own fit, whatever came before (AMP's FP32
    step, with every quantizer off, in between too)."""
    from rapidquant.mixed_precision.groups import apply_candidate, find_groups, parse_candidate, settle, snapshot
    with pytest.warns(UserWarning, match="widened"):
        sim, _ = calibrated(big_bias_net(), per_channel=False)
    own = {n: f.base.clone() for n, f in sim.bias_fits.items()}
    widened = {n: f.scale.clone() for n, f in sim.bias_fits.items()}
    groups, snap = find_groups(sim, sim.dummy_input), snapshot(sim)
    for name in ("W8A8", "W16A16", "W16A8", "FP32", "W16A16", "W8A16", "W16A8"):
        if name == "FP32":
            with sim.disabled():
                settle(sim, {}, snap)
            continue
        for g in groups:
            apply_candidate(sim, g, parse_candidate(name), snap)
        settle(sim, {}, snap)
        assert worst(sim) <= 1.0, name
        assert bool(sim.bias_fits) == (name == "W16A16"), (name, sim.bias_fits)
        if name == "W16A16":  # the same widened grids as at calibration, bit for bit
            assert all(torch.equal(sim.quantizer(n).scale, widened[n]) for n in widened)
            assert all(f.factor > 2 for f in sim.bias_fits.values()), sim.bias_fits
        if name == "W16A8":  # 16-bit weights on their own grids
            assert all(torch.equal(sim.quantizer(n).scale, own[n]) for n in own), name


def test_a_frozen_weight_encoding_that_cannot_hold_the_bias_is_named(tmp_path):
    with pytest.warns(UserWarning, match="widened"):
        sim, batches = calibrated(big_bias_net())
    for name, fit in list(sim.bias_fits.items()):  # as if loaded: the own encoding, frozen
        q = sim.quantizer(name)
        q.set_encoding(fit.base, q.zero_point)
        q.frozen = True
    with pytest.warns(UserWarning, match=r"int32 bias saturates in 2, 5 and their weight encodings are frozen"):
        fit_int32_biases(sim)
    assert set(sim.saturated_biases) == {"2", "5"} and not sim.bias_fits and worst(sim) > 1
    assert "frozen" in sim.saturated_biases["2"]
    with pytest.warns(UserWarning, match="int32 bias saturates in 2, 5: .*unfreeze"):
        sim.export(str(tmp_path), batches[0])


def test_autoquant_stages_and_report_name_the_widened_grids(tmp_path):
    import os
    m = big_bias_net()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 6, 6, generator=g) for _ in range(3)]
    fidelity = output_fidelity(m, batches)
    cfg = rq.AutoQuantConfig(sim=rq.QuantSimConfig(param_bw=16, act_bw=16), allowed_drop=0.01,
                             results_dir=str(tmp_path), num_calibration_batches=3, use_block_reconstruction=False,
                             latency_threads=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = rq.AutoQuant(m, batches[0], batches, fidelity, cfg, show_progress=False).optimize()
    assert res.met  # the clipped biases scored 1 - 0.97**2 here
    # the reported score is the file's, in a default onnxruntime session
    import onnxruntime as ort
    sess = ort.InferenceSession(res.onnx_path)
    name = sess.get_inputs()[0].name
    file_score = fidelity(lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0]))
    assert abs(file_score - res.score) <= 1e-6, (file_score, res.score)  # measured 0.0
    fits = [s.artifacts["bias_fits"] for s in res.stages if s.artifacts.get("bias_fits")]
    assert fits and all(set(f) == {"2", "5"} for f in fits), fits
    html = open(os.path.join(str(tmp_path), "report.html")).read()
    assert "weight grid widened for its int32 bias" in html and "coarser so the int32 bias fits" in html


def test_export_widens_a_grid_set_by_hand_after_calibration(tmp_path):
    """Calibrated at 8 bits (nothing to widen), then the input of the big-bias layers raised to
    16 bits by hand: the export widens their weight grids before writing the file."""
    m = big_bias_net()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 6, 6, generator=g) for _ in range(3)]
    sim = rq.QuantSim(m, batches[0], rq.QuantSimConfig(param_bw=16, act_bw=8))
    sim.compute_encodings(batches, show_progress=False)
    assert not sim.bias_fits
    for q in sim.activation_quantizers().values():
        q.set_precision("int", 16)
    assert worst(sim) > 1
    with pytest.warns(UserWarning, match="widened until the bias fits") as rec:
        res = sim.export(str(tmp_path), batches[0])
    assert not [w for w in rec if "saturates" in str(w.message)]
    assert worst(sim) <= 1 and {f.layer for f in sim.bias_fits.values()} == {"2", "5"}
    assert res.ort_ok and res.parity["default"].max_steps <= 1.001, res.parity


def test_seq_mse_widens_its_chosen_grid_before_freezing_it():
    """SeqMSE picks weight scales at or below the weights' own range and freezes them: a
    chosen grid too fine for the int32 bias is widened first."""
    with pytest.warns(UserWarning, match="widened"):
        sim, batches = calibrated(big_bias_net())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rq.seq_mse(sim, batches, show_progress=False)
    assert sim.quantizer("2.weight").frozen and not sim.saturated_biases
    assert worst(sim) <= 1.0 and {f.layer for f in sim.bias_fits.values()} == {"2", "5"}

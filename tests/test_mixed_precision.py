"""Sensitivity analysis, LiteMP, AMP and manual mixed precision."""
import copy
import json
import math
import os

import pytest
import torch
from torch import nn

import rapidquant as rq
from _digits import accuracy, calib_batches, trained_digits_net

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def sensitive_model():
    """The digits CNN with one outlier output channel in conv2 (FP32 function unchanged):
    per-tensor weight quantization of conv2 then loses most of its resolution."""
    fp = copy.deepcopy(trained_digits_net())
    rq.fold_batch_norms_(fp)
    with torch.no_grad():
        fp.conv2.weight[5] *= 40
        fp.conv2.bias[5] *= 40
        fp.conv3.weight[:, 5] /= 40
    return fp


def make_sim(model, **kw):
    cfg = rq.QuantSimConfig(**{"param_bw": 8, "act_bw": 8, "per_channel": False, **kw})
    sim = rq.QuantSim(model, calib_batches(1)[0], cfg)
    sim.compute_encodings(calib_batches(), show_progress=False)
    return sim


def test_analysis_ranks_the_sensitive_layer_first(sensitive_model, tmp_path):
    sim = make_sim(sensitive_model)
    before = {n: (q.enabled, q.bitwidth) for n, q in sim.quantizers().items()}
    res = rq.analyze(sim, accuracy, calib_batches(4), results_dir=str(tmp_path), show_progress=False)
    assert res.ranking()[0] == "conv2"
    assert res.fp32 >= res.quantized and math.isfinite(res.weights_only) and math.isfinite(res.activations_only)
    sq = {r["layer"]: r["sqnr_db"] for r in res.per_layer}
    assert sq["conv2"] < sq["conv1"] - 10  # the error appears at conv2 (and accumulates after it)
    assert {n: (q.enabled, q.bitwidth) for n, q in sim.quantizers().items()} == before  # restored
    doc = json.load(open(res.json_path))
    assert doc["per_layer"] and doc["ranges"]
    page = open(res.html_path).read()
    assert page.count("data:image/png;base64") >= 4 and "Per-layer sensitivity" in page


def test_lite_mp_promotes_the_sensitive_layer(sensitive_model):
    sim = make_sim(sensitive_model, param_bw=4)
    res = rq.analyze(sim, accuracy, calib_batches(2), per_layer=True, show_progress=False)
    before = accuracy(sim.model)
    promoted = rq.lite_mp(sim, res, percent=10, precision="int16")  # the top one of ~6 layers
    assert promoted == ["conv2"]
    assert sim.quantizer("conv2.weight").bitwidth == 16
    assert sim.quantizer("conv1.weight").bitwidth == 4
    assert accuracy(sim.model) > before


def test_amp_meets_drop_at_lower_bitops_and_resumes(sensitive_model, tmp_path):
    sim = make_sim(sensitive_model)
    calls = []

    def ev(m):
        calls.append(1)
        return accuracy(m)

    cands = [((8, "int"), (4, "int")), ((8, "int"), (8, "int")), ((16, "int"), (16, "int"))]
    res = rq.amp(sim, cands, ev, 0.01, calib_batches(8), results_dir=str(tmp_path), show_progress=False)
    assert res.met and res.chosen.score >= res.fp32_score - 0.01
    assert res.chosen.rel_bitops < 1.0  # cheaper than all-W16A16
    assert accuracy(sim.model) == pytest.approx(res.chosen.score)  # the sim is left in that state
    assert res.chosen.config["conv2"] in ("W16A16", "W8A8")
    assert os.path.exists(res.plot_path) and res.pareto_front
    assert res.calibration_passes == 0  # statistics were reused for every candidate

    # rerun: every phase-1 proxy and every score come from the saved results
    n = len(calls)
    res2 = rq.amp(sim, cands, ev, 0.01, calib_batches(8), results_dir=str(tmp_path), show_progress=False)
    assert len(calls) == n and res2.proxy_evaluations == 0 and res2.chosen.config == res.chosen.config


def test_amp_resumes_after_interruption_in_phase2(sensitive_model, tmp_path):
    sim = make_sim(sensitive_model)
    state = {"n": 0, "fail_after": 3}

    def ev(m):
        state["n"] += 1
        if state["fail_after"] and state["n"] > state["fail_after"]:
            raise KeyboardInterrupt("simulated crash in phase 2")
        return accuracy(m)

    with pytest.raises(KeyboardInterrupt):
        rq.amp(sim, ["W4A8", "W8A8", "W16A16"], ev, 0.01, calib_batches(8), results_dir=str(tmp_path),
               show_progress=False)
    state.update(n=0, fail_after=0)
    res = rq.amp(sim, ["W4A8", "W8A8", "W16A16"], ev, 0.01, calib_batches(8), results_dir=str(tmp_path),
                 show_progress=False)
    assert res.proxy_evaluations == 0  # phase 1 was saved before the crash
    assert res.evaluations == state["n"] and state["n"] < 6  # only the unsaved phase-2 points


def test_amp_early_exits(sensitive_model):
    sim = make_sim(sensitive_model)
    easy = rq.amp(sim, ["W8A8", "W16A16"], lambda m: 1.0, 0.5, calib_batches(4), show_progress=False)
    assert easy.met and "cheapest" in easy.message and easy.chosen.rel_bitops < 1
    impossible = rq.amp(sim, ["W4A8", "W8A8"], accuracy, -0.5, calib_batches(4), show_progress=False)
    assert not impossible.met and "cannot meet" in impossible.message


def test_amp_brute_force_builds_the_whole_curve(sensitive_model):
    sim = make_sim(sensitive_model)
    res = rq.amp(sim, ["W4A8", "W8A8"], accuracy, None, calib_batches(4), show_progress=False)
    assert not res.met
    # every prefix of the phase-1 order is evaluated (plus all-low); the front keeps the undominated
    prefixes = sorted(p.prefix for p in res.evaluated)
    assert len(res.evaluated) >= 4 and prefixes == sorted(set(prefixes))
    front = res.pareto_front
    assert front and all(not (q.rel_bitops <= p.rel_bitops and q.score > p.score) for p in front
                         for q in res.evaluated)
    assert all(p in res.evaluated for p in front) and len(front) <= len(res.evaluated)


def test_amp_bad_input(sensitive_model):
    sim = make_sim(sensitive_model)
    with pytest.raises(ValueError, match="at least two distinct candidates"):
        rq.amp(sim, ["W8A8"], accuracy, 0.01, calib_batches(2))
    with pytest.raises(ValueError, match="baseline W16A16 is not among"):
        rq.amp(sim, ["W4A8", "W8A8"], accuracy, 0.01, calib_batches(2), baseline="W16A16")
    with pytest.raises(ValueError, match="one finite real number"):
        rq.amp(sim, ["W4A8", "W8A8"], lambda m: float("nan"), 0.01, calib_batches(2), show_progress=False)
    with pytest.raises(ValueError, match="candidate dtype"):
        rq.amp(sim, [((8, "int"), (8, "int")), ((8, "bogus"), (8, "int"))], accuracy, 0.01, calib_batches(2))
    cfg = json.load(open(os.path.join(os.path.dirname(rq.__file__), "hw_configs", "default_per_channel.json")))
    cfg["defaults"]["supported_kernels"] = [{"activation": {"bitwidth": 8, "dtype": "int"},
                                             "param": {"bitwidth": 8, "dtype": "int"}}]
    s2 = rq.QuantSim(sensitive_model, calib_batches(1)[0], rq.QuantSimConfig(hw_config=cfg))
    s2.compute_encodings(calib_batches(2), show_progress=False)
    with pytest.raises(ValueError, match="supported_kernels"):
        rq.amp(s2, ["W4A8", "W16A16"], accuracy, 0.01, calib_batches(2))


def test_manual_precision_api(sensitive_model):
    sim = make_sim(sensitive_model)
    log = rq.set_precision(sim, "conv2", activation="int16", param="int16")
    assert sim.quantizer("conv2.weight").bitwidth == 16
    assert sim.quantizer("relu1.output").bitwidth == 16  # the activation feeding conv2 follows it
    assert any("conv2.weight" in line for line in log)
    rq.set_precision(sim, nn.Linear, param="int4")
    assert sim.quantizer("fc.weight").bitwidth == 4
    rq.set_precision(sim, "model_input", activation="int16")
    assert sim.quantizer("input_x.output").bitwidth == 16
    log = rq.set_precision(sim, "conv3", activation="int8")  # relu2 feeds conv3; no conflict with conv2
    log = rq.set_precision(sim, "conv2", activation="int8")   # conflicts with the earlier int16 request
    assert any("conflict" in line for line in log) and sim.quantizer("relu1.output").bitwidth == 16
    rq.set_precision(sim, "relu2", activation="fp16")
    assert sim.quantizer("relu2.output").dtype == "float"
    with torch.no_grad():
        assert torch.isfinite(sim.model(calib_batches(1)[0])).all()
    with pytest.raises(ValueError, match="choose one of"):
        rq.set_precision(sim, "conv2", activation="int7")
    with pytest.raises(KeyError):
        rq.set_precision(sim, "nope", activation="int8")


def test_amp_after_adaround_uses_the_float_weights_at_other_precisions():
    """AdaRound writes its W2 rounding into the weights; AMP moving a layer to W8 must use
    the float weights (and their statistics), not re-round the W2 ones; FP32 is the model
    before rounding. Measured: W8A8 everywhere 0.9395 (= a fresh W8A8 sim, = FP32) with the
    float weights, 0.652 re-rounding the W2 weights."""
    fp = copy.deepcopy(trained_digits_net())
    rq.fold_batch_norms_(fp)
    x = calib_batches(1)[0]
    r = rq.adaround(fp, x, calib_batches(), rq.AdaRoundConfig(iterations=20, param_bw=2), show_progress=False)
    sim = rq.QuantSim(r.model, x, rq.QuantSimConfig(param_bw=2, act_bw=8))
    r.apply_to(sim)
    sim.compute_encodings(calib_batches(), show_progress=False)
    rounded_score = accuracy(sim.model)
    assert set(r.float_weights) == {n for n, q in sim.param_quantizers().items() if q.frozen}
    scores = []

    def ev(m):
        scores.append(accuracy(m))
        if len(scores) == 3:
            raise RuntimeError("eval failed mid-search")
        return scores[-1]
    with pytest.raises(RuntimeError, match="mid-search"):
        rq.amp(sim, ("W2A8", "W8A8"), ev, 0.5, calib_batches(), float_weights=r.float_weights, show_progress=False)
    fp32, w8_everywhere = scores[:2]  # then the baseline W8A8 everywhere
    assert fp32 == accuracy(fp)
    assert w8_everywhere >= fp32 - 0.01, (w8_everywhere, fp32)  # margin: 0.01 (5 of 397 images)
    # the failed search put back the rounded weights and their frozen encodings exactly
    assert accuracy(sim.model) == rounded_score
    params = sim.parameters_quantized()
    for n in r.float_weights:
        assert torch.equal(params[n], r.model.get_parameter(n)) and sim.quantizer(n).frozen


def test_amp_latency_cost_picks_the_fastest_point_that_meets(sensitive_model, tmp_path, monkeypatch):
    """cost="latency": every evaluated point (and the float model) is exported and timed in
    onnxruntime; the choice is the fastest point meeting the target, not the fewest BitOps.
    The timings are planted (fewer BitOps = slower, float fastest) so the choice is decided."""
    from rapidquant.export import latency as L
    sim = make_sim(sensitive_model)
    cands = ["W4A8", "W8A8", "W16A16"]
    by_bitops = rq.amp(sim, cands, accuracy, 0.01, calib_batches(8), show_progress=False)
    timed = {}

    def planted(runs, repeats=30, rounds=3):
        for run in runs.values():
            run()  # the exported files run
        timed.update(runs)
        return {k: 0.1 if k == "float" else 10.0 - k for k in runs}  # points by BitOps: cheaper = slower

    monkeypatch.setattr(L, "median_latencies", planted)
    res = rq.amp(sim, cands, accuracy, 0.01, calib_batches(8), results_dir=str(tmp_path), show_progress=False,
                 cost="latency")
    assert res.cost == "latency" and res.float_latency_ms == 0.1 and len(timed) == len(
        {json.dumps(p.config, sort_keys=True) for p in res.evaluated}) + 1
    assert all(p.latency_ms is not None for p in res.evaluated)
    ok = [p for p in res.evaluated if p.score >= res.target]
    assert res.met and res.chosen.latency_ms == min(p.latency_ms for p in ok)
    assert res.chosen.config != by_bitops.chosen.config  # the BitOps choice is timed slower here
    assert "float model runs faster" in res.message
    assert accuracy(sim.model) == pytest.approx(res.chosen.score)  # the sim is left at the choice
    front = sorted(res.pareto_front, key=lambda p: p.latency_ms)
    assert all(a.score < b.score for a, b in zip(front, front[1:]))  # each slower point buys score
    assert len(os.listdir(tmp_path / "latency")) >= len(timed) and os.path.exists(res.plot_path)
    # within timing noise (LATENCY_TIE) of the fastest, the fewest BitOps: the BitOps choice again
    monkeypatch.setattr(L, "median_latencies", lambda runs, **kw: {k: 9.0 if k == "float" else 5.0 - 0.01 * k
                                                                  for k in runs})  # more BitOps, 0.2% faster
    tie = rq.amp(sim, cands, accuracy, 0.01, calib_batches(8), show_progress=False, cost="latency")
    assert tie.chosen.config == by_bitops.chosen.config and "float model runs faster" not in tie.message
    with pytest.raises(ValueError, match="cost="):
        rq.amp(sim, cands, accuracy, 0.01, calib_batches(8), show_progress=False, cost="time")


def test_amp_latency_cost_measures_real_files(sensitive_model):
    """Without planted figures: real medians, positive, the same for a repeated configuration."""
    sim = make_sim(sensitive_model)
    res = rq.amp(sim, ["W8A8", "W16A16"], accuracy, 0.01, calib_batches(4), show_progress=False,
                 cost="latency")
    assert res.float_latency_ms > 0 and all(p.latency_ms > 0 for p in res.evaluated)
    by_config = {}
    for p in res.evaluated:
        assert by_config.setdefault(json.dumps(p.config, sort_keys=True), p.latency_ms) == p.latency_ms
    assert res.chosen in res.evaluated and res.chosen.score >= res.target

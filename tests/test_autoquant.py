"""AutoQuant flow decisions with real (small) components, resume, budget, and the CLI demo."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import rapidquant as rq
import rapidquant.autoquant as AQ
from rapidquant import zoo

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def ev(model, num_samples=None):
    return zoo.accuracy(model)


def data(n=4):
    return zoo.calibration_batches(n)


def run(model, tmp_path, log=None, **kw):
    cfg = rq.AutoQuantConfig(**{"num_calibration_batches": 4, "results_dir": str(tmp_path), "export": False,
                                "scheme_candidates": (("minmax", "minmax"), ("mse", "sqnr")), **kw})
    return rq.AutoQuant(model, data(1)[0], data(), ev, cfg, show_progress=False, log=log).optimize()


def status(res):
    return {s.name: s.status for s in res.stages}


def test_early_exit_on_w32_check(tmp_path):
    res = run(zoo.pretrained("digits_mobilenet"), tmp_path, act_bw=2)
    st = status(res)
    assert st["w32_check"] == "ok" and not res.met
    assert st["bn_fold"] == st["cle"] == st["adaround"] == "skipped"
    assert "activation quantization alone" in res.message
    assert next(s for s in res.stages if s.name == "w32_check").score < res.target


def test_w32_failure_with_amp_candidates_goes_on_to_amp(tmp_path):
    """Weight techniques cannot fix 2-bit activations, AMP can: BN folding and CLE still run
    to give it a deployable start, AdaRound does not."""
    res = run(zoo.pretrained("digits_mobilenet"), tmp_path, act_bw=2, amp_candidates=("W8A2", "W8A8"))
    st = status(res)
    assert next(s for s in res.stages if s.name == "w32_check").score < res.target
    assert st["bn_fold"] in ("ok", "met") and st["cle"] in ("ok", "met") and st["adaround"] == "skipped"
    assert st["amp"] == "met" and res.met and res.best_stage == "amp"


@pytest.fixture(scope="module")
def bn_hidden_outlier():
    """ResNet-style digits net whose stem conv has one channel x100, undone by its BN: the
    FP32 function is unchanged, per-tensor weights collapse until the BN is folded."""
    m = copy.deepcopy(zoo.pretrained("digits_resnet"))
    conv, bn = m.stem[0], m.stem[1]
    with torch.no_grad():
        conv.weight[0] *= 100
        bn.running_mean[0] *= 100
        bn.running_var[0] *= 100 ** 2
    return m.eval()


def test_stops_after_bn_folding_when_it_suffices(bn_hidden_outlier, tmp_path):
    assert abs(zoo.accuracy(bn_hidden_outlier) - zoo.accuracy(zoo.pretrained("digits_resnet"))) < 0.003
    res = run(bn_hidden_outlier, tmp_path, param_bw=8, per_channel=False, allowed_drop=0.01)
    st = status(res)
    assert res.met and res.best_stage == "bn_fold" and st["bn_fold"] == "met"
    assert st["scheme_selection"] == "ok"  # it ran and missed
    assert st["cle"] == st["adaround"] == "skipped"


def test_best_result_when_target_never_met_and_determinism(tmp_path):
    m = zoo.pretrained("digits_mobilenet")
    # 2-bit per-tensor weights: activations alone pass the W32 check, no weight technique recovers
    res = run(m, tmp_path / "a", allowed_drop=0.005, use_adaround=False, param_bw=2, per_channel=False)
    assert not res.met and "no stage met the target" in res.message
    scores = {s.name: s.score for s in res.stages if s.score is not None}
    # the scheme-selection score (BNs unfolded) picks the scheme but is never the result
    assert res.score == max(v for k, v in scores.items() if k in ("bn_fold", "cle"))
    again = run(m, tmp_path / "b", allowed_drop=0.005, use_adaround=False, param_bw=2, per_channel=False)
    assert [s.score for s in again.stages] == [s.score for s in res.stages]  # deterministic


def test_unfolded_bn_score_is_never_the_result(tmp_path):
    """A sim with BNs left unfolded is not what a target runs: even when it meets the target at
    scheme selection, the result comes from the BN-folded model; a model without foldable BNs
    may stop at scheme selection."""
    m = zoo.pretrained("digits_mobilenet")
    res = run(m, tmp_path / "a", param_bw=8, allowed_drop=0.01, use_adaround=False)
    sel = next(s for s in res.stages if s.name == "scheme_selection")
    assert sel.score >= res.target and "only picks the scheme" in sel.message
    assert res.met and res.best_stage == "bn_fold"
    folded = copy.deepcopy(m)
    rq.fold_batch_norms(folded)
    res = run(folded, tmp_path / "b", param_bw=8, allowed_drop=0.01, use_adaround=False)
    assert res.met and res.best_stage == "scheme_selection"


def test_failing_stage_strict_and_not(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("equalization exploded")
    monkeypatch.setattr(AQ, "equalize", boom)
    m = zoo.pretrained("digits_mobilenet")
    res = run(m, tmp_path / "lenient", allowed_drop=0.005, use_adaround=False, param_bw=2, per_channel=False)
    st = status(res)
    assert st["cle"] == "failed" and "equalization exploded" in next(s for s in res.stages if s.name == "cle").message
    with pytest.raises(RuntimeError, match="equalization exploded"):
        run(m, tmp_path / "strict", allowed_drop=0.005, use_adaround=False, param_bw=2, per_channel=False,
            strict=True)


def test_resume_after_crash_and_invalidation(tmp_path, monkeypatch):
    m = copy.deepcopy(zoo.pretrained("digits_mobilenet"))
    real = AQ.adaround

    def crash(*a, **k):
        raise KeyboardInterrupt("killed during AdaRound")
    monkeypatch.setattr(AQ, "adaround", crash)
    kw = dict(allowed_drop=0.005, param_bw=2, per_channel=False, adaround=rq.AdaRoundConfig(iterations=30))
    with pytest.raises(KeyboardInterrupt):
        run(m, tmp_path, **kw)
    monkeypatch.setattr(AQ, "adaround", real)
    lines = []
    res = run(m, tmp_path, log=lines.append, **kw)
    for name in ("fp32", "scheme_selection", "w32_check", "bn_fold", "cle"):
        assert any(line.startswith(f"{name}:") and "(cached)" in line for line in lines), name
    assert status(res)["adaround"] in ("ok", "met") and not any(
        line.startswith("adaround:") and "(cached)" in line for line in lines)
    # a changed model invalidates the cache: everything recomputes
    with torch.no_grad():
        m.classifier[1].bias.add_(1e-3)
    lines.clear()
    run(m, tmp_path, log=lines.append, **kw)
    assert not any("(cached)" in line for line in lines)


def test_time_budget_is_honoured(tmp_path):
    res = run(zoo.pretrained("digits_mobilenet"), tmp_path, time_budget_s=0.0, allowed_drop=-1.0)
    st = status(res)
    assert st["fp32"] == "ok" and st["scheme_selection"] == "skipped"
    assert "time budget" in res.message and not res.met


def test_run_inference_and_export(tmp_path):
    m = zoo.pretrained("digits_mobilenet")
    cfg = rq.AutoQuantConfig(results_dir=str(tmp_path), num_calibration_batches=4)
    aq = rq.AutoQuant(m, data(1)[0], data(), ev, cfg, show_progress=False)
    sim, score = aq.run_inference()
    assert 0.9 < score <= 1.0 and sim.quantizers()
    res = aq.optimize()
    assert res.met and os.path.exists(res.onnx_path) and os.path.exists(res.encodings_path)
    assert res.export_check["ort_ok"]
    page = open(res.report_path).read()
    assert "Flow" in page and "Export check" in page and "data:image/png;base64" in page


def test_empty_data_and_bad_eval(tmp_path):
    with pytest.raises(ValueError, match="no calibration batches"):
        rq.AutoQuant(zoo.pretrained(), data(1)[0], [], ev)
    aq = rq.AutoQuant(zoo.pretrained(), data(1)[0], data(), lambda m, n=None: float("nan"),
                      rq.AutoQuantConfig(results_dir=str(tmp_path)), show_progress=False)
    with pytest.raises(RuntimeError, match="FP32 evaluation failed.*finite float"):
        aq.optimize()


@pytest.mark.slow
def test_cli_demo_end_to_end(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "rapidquant.cli", "autoquant", "--quick", "--threads", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report:" in proc.stdout and (out / "model.onnx").exists() and (out / "model.encodings.json").exists()
    page = (out / "report.html").read_text()
    for stage in AQ.STAGES:
        assert stage in page, stage  # the stages table names every stage
    bad = subprocess.run([sys.executable, "-m", "rapidquant.cli", "autoquant", "--model", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "give --model, --data and --eval together" in bad.stderr
    helptext = subprocess.run([sys.executable, "-m", "rapidquant.cli", "analyze", "--help"],
                              capture_output=True, text=True, timeout=120)
    assert helptext.returncode == 0 and "--model" in helptext.stdout

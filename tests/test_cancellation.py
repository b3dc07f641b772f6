"""A layer whose bias cancels most of its weighted sum is named at calibration (u2netp: one
such conv held the model at 14.1 dB, 25.0 dB with 16-bit weights on it, and nothing said so)."""
import warnings

import pytest
import torch
from torch import nn

import rapidquant as rq


def offset_net(cancel: bool = True):
    """l1 outputs about 100 + noise; l2's bias removes l2's response to the 100 (cancel=True),
    so l2 outputs a small difference of large numbers."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        m[0].bias.fill_(100.0)
        m[1].bias.copy_(-100.0 * m[1].weight.sum(1) if cancel else torch.zeros(4))
    return m


@pytest.mark.parametrize("padding,padding_mode", [(0, "zeros"), (1, "reflect")])
def test_a_cancelling_conv_is_named_whatever_its_padding(padding, padding_mode):
    """A conv whose padding is not zeros runs through the module itself: its pre-bias output
    must still leave the bias out (it once counted it twice and named nothing). Zero padding
    would add borders the bias does not cancel (measured 2.5x there): none here."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                      nn.Conv2d(8, 4, 3, padding=padding, padding_mode=padding_mode)).eval()
    with torch.no_grad():
        m[0].bias.fill_(100.0)
        m[1].bias.copy_(-100.0 * m[1].weight.sum((1, 2, 3)))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = rq.QuantSim(m, batches[0])
        sim.compute_encodings(batches, show_progress=False)
    assert [w["name"] for w in sim.calibration_warnings if w.get("kind") == "cancellation"] == ["1"]


def calibrate(m, **cfg):
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 8, generator=g) for _ in range(3)]
    sim = rq.QuantSim(m, batches[0], rq.QuantSimConfig(**cfg))
    sim.compute_encodings(batches, show_progress=False)
    return sim, batches


def output_sqnr(sim, m, batches) -> float:
    with torch.no_grad():
        ref, got = torch.cat([m(x) for x in batches]), torch.cat([sim.model(x) for x in batches])
    return float(10 * torch.log10(ref.pow(2).mean() / (got - ref).pow(2).mean()))


def test_a_cancelling_layer_is_named_with_its_figures():
    m = offset_net()
    with pytest.warns(UserWarning, match=r"(?s)small difference of large numbers \(1\).*\n  1: the bias "
                                         r"cancels most of the output .*set_precision\('int', 16\)"):
        sim, batches = calibrate(m)
    (w,) = [w for w in sim.calibration_warnings if w.get("kind") == "cancellation"]
    assert w["name"] == "1" and w["cancellation"] > 10 and w["weight_sqnr_db"] < 20, w
    # what it names is real: measured 4.9 dB on the model's output (104x cancellation, 5.3 dB from
    # l2's weight rounding); with l2's weights in float 13.6 dB (its input grid is coarse too)
    assert output_sqnr(sim, m, batches) < 10


def test_no_word_without_cancellation_or_with_enough_weight_bits():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: no other calibration warning either
        sim, _ = calibrate(offset_net(cancel=False))
    assert not sim.calibration_warnings
    # 16-bit weights on the cancelling layer: its weight rounding leaves enough (measured 49.7 dB)
    sim, _ = calibrate(offset_net(), param_bw=16)
    assert not [w for w in sim.calibration_warnings if w.get("kind") == "cancellation"]


def test_autoquant_report_names_the_cancelling_layer(tmp_path):
    import os
    m = offset_net()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 8, generator=g) for _ in range(3)]
    cfg = rq.AutoQuantConfig(sim=rq.QuantSimConfig(param_bw=8, act_bw=8), allowed_drop=0.5, results_dir=str(tmp_path),
                             num_calibration_batches=3, use_block_reconstruction=False, latency_threads=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = rq.AutoQuant(m, batches[0], batches, lambda model: 1.0, cfg, show_progress=False).optimize()
    named = [s.artifacts["cancelling"] for s in res.stages if s.artifacts.get("cancelling")]
    assert named and all(set(n) == {"1"} for n in named), named
    html = open(os.path.join(str(tmp_path), "report.html")).read()
    assert "bias cancels the output" in html and "pre-bias rms" in html

"""Techniques on inputs they used to crash on or silently skip: BNs without running
statistics, analytical bias correction after folding, fp16 models with fp32 batches, and
every technique's record of what it treated and what it left alone."""
import copy

import pytest
import torch
from torch import nn

import rapidquant as rq
from _digits import calib_batches, trained_digits_net
from _models import MobileNetV2ish

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ------------------------------------------------------------------ BN folding
class BatchStatsBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False)
        self.c2, self.b2 = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))


def test_bn_without_running_stats_is_reported_not_crashed():
    m = BatchStatsBN().eval()
    x = torch.randn(4, 3, 8, 8)
    ref = m(x)
    res = rq.fold_batch_norms(m)
    assert [f[:2] for f in res.folded] == [("c2", "b2")]
    reasons = dict(res.not_folded)
    assert "track_running_stats=False" in reasons["b1"]
    assert isinstance(m.b1, nn.BatchNorm2d)  # left alone
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_fold_to_scale_reports_bn_without_running_stats():
    m = BatchStatsBN().eval()
    x = torch.randn(4, 3, 8, 8)
    sim = rq.QuantSim(m, x, rq.QuantSimConfig(param_bw=8, act_bw=8))
    sim.compute_encodings([x], show_progress=False)
    res = rq.fold_batch_norms_to_scale(sim)
    assert "track_running_stats=False" in dict(res.not_folded)["b1"]


# ------------------------------------------------------------------ analytical bias correction
def _mean_output_error(sim, fp):
    with torch.no_grad():
        return torch.stack([(sim.model(b) - fp(b)).mean(0) for b in calib_batches(8)]).mean(0).abs().mean().item()


@pytest.mark.parametrize("prepare", ["fold", "cle"])
def test_analytical_bias_correction_uses_folded_bn_statistics(prepare):
    fp = trained_digits_net()
    m = copy.deepcopy(fp)
    x = calib_batches(1)[0]
    rq.fold_batch_norms(m) if prepare == "fold" else rq.equalize(m, x)
    sim = rq.QuantSim(m, x, rq.QuantSimConfig(param_bw=3, act_bw=8, per_channel=False))
    sim.compute_encodings(calib_batches(), show_progress=False)
    before = _mean_output_error(sim, fp)
    res = rq.correct_bias(sim, None, rq.BiasCorrectionConfig(mode="analytical"))
    after = _mean_output_error(sim, fp)
    assert sorted(res.deltas) == ["conv2", "conv3"]  # fed by ReLU of a layer with a folded BN
    assert {n for n, _ in res.skipped} == {"conv1", "fc"}
    # measured after / before: 0.58 (fold), 0.68 (cle); allowed 0.8
    assert after < 0.8 * before


def test_analytical_bias_correction_treats_as_many_layers_after_folding():
    m = MobileNetV2ish().eval()
    x = torch.randn(2, 3, 32, 32)
    cfg = rq.QuantSimConfig(param_bw=4, act_bw=8)

    def corrected(model):
        sim = rq.QuantSim(model, x, cfg)
        sim.compute_encodings([torch.randn(8, 3, 32, 32)], show_progress=False)
        return sorted(rq.correct_bias(sim, None, rq.BiasCorrectionConfig(mode="analytical")).deltas)

    unfolded = corrected(m)
    folded = copy.deepcopy(m)
    rq.fold_batch_norms(folded)
    assert len(unfolded) > 0 and corrected(folded) == unfolded


# ------------------------------------------------------------------ fp16 models, fp32 batches
def test_fp16_model_with_fp32_batches_runs_every_batch_technique():
    fp = copy.deepcopy(trained_digits_net()).half()
    x = calib_batches(1)[0]  # float32, as a data loader gives them
    r = rq.adaround(fp, x, calib_batches(2), rq.AdaRoundConfig(iterations=20), show_progress=False)
    assert r.model.conv1.weight.dtype == torch.float16 and len(r.layers) == 4
    h = rq.reestimate_bn_stats(copy.deepcopy(fp), calib_batches(2), show_progress=False)
    assert h.batches == 2
    for run in (lambda s: rq.seq_mse(s, calib_batches(2), show_progress=False),
                lambda s: rq.correct_bias(s, calib_batches(2), show_progress=False)):
        sim = rq.QuantSim(fp, x.half(), rq.QuantSimConfig(param_bw=4))
        sim.compute_encodings([b.half() for b in calib_batches(2)], show_progress=False)
        assert run(sim)


def test_mixed_dtype_model_is_a_clear_error():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    m[2].half()
    with pytest.raises(TypeError, match="mixes parameter dtypes.*model.to"):
        rq.reestimate_bn_stats(m, [torch.randn(2, 4)], show_progress=False)

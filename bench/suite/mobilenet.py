"""ImageNet MobileNetV2 scored against the float model on crops of real photos.

The score is top-1 agreement on the crops the float model is confident about (top-1
probability >= 0.5): photo crops have no labels, and agreement on the crops where the
float model is unsure mostly counts flips between equally wrong classes. These crops stand in
for the images it classifies correctly, so the score moves like ImageNet accuracy. All-crop
agreement, KL and logit SQNR come in the notes."""
from __future__ import annotations

import copy
import tempfile

import torch
import torch.nn.functional as F

import rapidquant as rq

from . import aimet
from .table import Timer, row

CASE = "mobilenetv2"


class Fidelity:
    def __init__(self, fp, x, confident=0.5):
        self.x = x
        self.ref = self.logits(fp)
        self.top1 = self.ref.argmax(1)
        self.mask = self.ref.softmax(1).max(1).values >= confident

    def logits(self, model, x=None):
        with torch.no_grad():
            return torch.cat([model(b) for b in (self.x if x is None else x).split(32)])

    def score(self, model) -> float:
        """Runs the confident crops only (the score ignores the rest)."""
        out = self.logits(model, self.x[self.mask])
        return (out.argmax(1) == self.top1[self.mask]).float().mean().item()

    def score_of(self, out) -> float:
        return (out.argmax(1) == self.top1)[self.mask].float().mean().item()

    def notes(self, model) -> str:
        out = self.logits(model)
        agree = (out.argmax(1) == self.top1).float().mean().item()
        kl = F.kl_div(out.log_softmax(1), self.ref.log_softmax(1), log_target=True, reduction="batchmean").item()
        sqnr = 10 * torch.log10(self.ref.pow(2).sum() / (out - self.ref).pow(2).sum()).item()
        return f"all crops {agree:.3f}, KL {kl:.3f}, SQNR {sqnr:.1f} dB"


def _ort_logits(path, x):
    """Logits of the exported file in onnxruntime with default session options (what a user runs)."""
    from rapidquant.export import OnnxRuntimeModule
    m = OnnxRuntimeModule(path)
    return torch.cat([m(b) for b in x.split(16)])


def mobilenet_case(quick: bool):
    from rapidquant.zoo import imagenet as I
    try:
        fp = I.pretrained_mobilenet_v2()
    except ImportError as e:
        print(f"  {CASE}: skipped ({e})")
        return
    n_eval, n_cal, iters, n_ada = (256, 64, 20, 2) if quick else (768, 128, 100, 4)
    fid = Fidelity(fp, I.fidelity_crops(n_eval, "evaluation"))
    calib = list(I.fidelity_crops(n_cal, "calibration").split(16))
    dummy = calib[0]
    print(f"  {CASE}: {len(I.photo_paths())} photos, {n_eval} evaluation crops ({int(fid.mask.sum())} confident), "
          f"{n_cal} calibration crops")
    row(CASE, "FP32", 1.0, 1.0, 0, fid.notes(fp))

    def sim_row(label, model, per_channel, aimet_kw, seconds0=0.0):
        with Timer() as t:
            sim = rq.QuantSim(model, dummy, rq.QuantSimConfig(per_channel=per_channel))
            sim.compute_encodings(calib, show_progress=False)
        a = aimet.run("quantsim", lambda: aimet.quantsim(fp, dummy, calib, 8, 8, per_channel, **aimet_kw), fid.score)
        row(CASE, label, fid.score(sim.model), 1.0, seconds0 + t.seconds, fid.notes(sim.model), aimet=a)
        return sim

    sim_row("W8A8 per-tensor naive", fp, False, {})
    sim_row("W8A8 per-channel naive", fp, True, {})
    with Timer() as t:
        folded = copy.deepcopy(fp)
        rq.fold_batch_norms_(folded)
    sim_row("W8A8 per-tensor + BN fold", folded, False, {"fold": True}, t.seconds)
    with Timer() as t:
        eq = copy.deepcopy(folded)
        rq.equalize_(eq, rq.CLEConfig(fold_bn=False))
    sim = sim_row("W8A8 per-tensor + BN fold + CLE", eq, False, {"cle": True}, t.seconds)
    with Timer() as t:
        rq.correct_bias(sim, calib, show_progress=False)
    row(CASE, "W8A8 per-tensor + BN fold + CLE + bias corr.", fid.score(sim.model), 1.0, t.seconds,
        fid.notes(sim.model), aimet=aimet.run("bias_correction", lambda: aimet.bias_correction(fp, dummy, calib),
                                              fid.score))
    for bw, pc in ((8, False),) if quick else ((8, False), (4, True)):  # W4 needs more iterations
        with Timer() as t:
            cfg = rq.AdaRoundConfig(param_bw=bw, per_channel=pc, num_batches=n_ada, iterations=iters)
            ada = rq.adaround(eq, dummy, calib, cfg, show_progress=False)
            s2 = rq.QuantSim(ada.model, dummy, rq.QuantSimConfig(param_bw=bw, per_channel=pc))
            ada.apply_to(s2)
            s2.compute_encodings(calib, show_progress=False)
        a = aimet.run("adaround", lambda: aimet.adaround(fp, dummy, calib, bw, pc, iters, n_ada, cle=True), fid.score)
        row(CASE, f"W{bw}A8 per-{'channel' if pc else 'tensor'} + BN fold + CLE + AdaRound", fid.score(s2.model),
            1.0, t.seconds, fid.notes(s2.model) + f", {iters} it/layer", aimet=a)
    amp_fallback = ("W8A8", "W16A16") if quick else ("W8A8", "W8A16", "W16A16")
    with tempfile.TemporaryDirectory() as d, Timer() as t:
        cfg = rq.AutoQuantConfig(sim=rq.QuantSimConfig(param_bw=8, act_bw=8, per_channel=False), allowed_drop=0.01, results_dir=d,
                                 num_calibration_batches=len(calib), schemes_fully_evaluated=1,
                                 adaround=rq.AdaRoundConfig(iterations=iters, num_batches=n_ada),
                                 scheme_candidates=(("minmax", "minmax"),) if quick else
                                 (("minmax", "minmax"), ("mse", "sqnr")),
                                 amp_candidates=amp_fallback, use_adaround=not quick,
                                 num_proxy_batches=1 if quick else 4)
        res = rq.AutoQuant(fp, dummy, calib, lambda m, n=None: fid.score(m), cfg, show_progress=False).optimize()
        ort = fid.score_of(_ort_logits(res.onnx_path, fid.x)) if res.onnx_path else None
    row(CASE, "AutoQuant W8A8 per-tensor (+AMP fallback), drop 0.01", res.score, 1.0, t.seconds,
        f"met={res.met} at {res.best_stage}, AMP over {'/'.join(amp_fallback)}"
        + (", AdaRound stage off in --quick" if quick else ""), ort,
        aimet=aimet.run("autoquant", lambda: aimet.autoquant(fp, dummy, calib, fid.score, 8, False, 0.01, iters,
                                                             n_ada, amp_fallback)))
    with Timer() as t:
        sim = rq.QuantSim(eq, dummy, rq.QuantSimConfig(per_channel=False))
        sim.compute_encodings(calib, show_progress=False)
        cands = ["W8A8", "W16A16"] if quick else ["W8A8", "W8A16", "W16A16"]
        r = rq.amp(sim, cands, fid.score, 0.01, calib, num_proxy_batches=1, show_progress=False)
    pt = r.chosen or max(r.pareto_front, key=lambda p: p.score)
    a = aimet.run("amp", lambda: aimet.amp(fp, dummy, calib, fid.score, cands, 0.01, 1, cle=True), fid.score)
    row(CASE, f"AMP {'/'.join(cands)} (after CLE), drop 0.01", pt.score, 1.0, t.seconds,
        f"{pt.rel_bitops:.2f}x BitOps of {cands[-1]}; {r.message}", aimet=a)

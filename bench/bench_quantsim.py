"""QuantSim benchmark: calibration time per scheme and eval-mode forward overhead.

    python bench/bench_quantsim.py [--threads N] [--batches B]

Model: a MobileNetV2-style conv net (depthwise convs, BN, ReLU6, residual adds) and a
ResNet-style conv net, batch 32 of 3x64x64 images, pinned thread count. Overhead is the
median eval-mode forward time of sim.model over the FP32 model, measured interleaved.
Every sim is checked first (check_sim_quantizes): all Conv/Linear weights quantized, output
SQNR against FP32 above SQNR_FLOOR_DB but not identical; SystemExit otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Case, machine_line, run_interleaved, write_table  # noqa: E402

import rapidquant as rq  # noqa: E402
from rapidquant.qmodules import QuantizedModule  # noqa: E402
from rapidquant.scoring import sqnr_db  # noqa: E402

# W8A8 output SQNR against FP32 measures 43-49 dB on these nets with minmax/mse/sqnr and
# about 24 dB with entropy (it clips tails by design); a sim with collapsed or wrong ranges
# lands near 0 dB (the entropy calibration bug this check found: 0.3 dB)
SQNR_FLOOR_DB = 15.0
WEIGHT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def mobilenet_ish(width=32):
    def ir(cin, cout, stride, e=4):
        hid = cin * e
        return nn.Sequential(nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
                             nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
                             nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    class Res(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.b = ir(c, c, 1)

        def forward(self, x):
            return x + self.b(x)

    return nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6(),
                         Res(width), ir(width, 2 * width, 2), Res(2 * width), Res(2 * width),
                         ir(2 * width, 4 * width, 2), Res(4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 100))


def resnet_ish(width=32):
    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(x + self.b2(self.c2(self.relu(self.b1(self.c1(x))))))

    return nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                         Block(width), Block(width), nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
                         Block(2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 100))


def check_sim_quantizes(label, model, sim, x):
    """SystemExit unless sim.model quantizes every Conv/Linear weight (enabled quantizer
    with an encoding) and its output differs from FP32 by no more than SQNR_FLOOR_DB allows."""
    # a sim that skips layers, or quantizes nothing or garbage, times fast and proves nothing
    wrapped = {id(m.module) for m in sim.model.modules() if isinstance(m, QuantizedModule)}
    bad = [n for n, m in sim.model.named_modules() if isinstance(m, WEIGHT_LAYERS) and id(m) not in wrapped]
    for n, m in sim.model.named_modules():
        if isinstance(m, QuantizedModule) and isinstance(m.module, WEIGHT_LAYERS):
            q = m.param_quantizers["weight"] if "weight" in m.param_quantizers else None
            if q is None or not q.enabled or q.encoding is None:
                bad.append(n)
    if bad:
        raise SystemExit(f"{label}: Conv/Linear weights not quantized (no enabled, calibrated weight "
                         f"quantizer): {bad}")
    uncalibrated = [n for n, q in sim.quantizers().items() if q.enabled and q.encoding is None]
    if uncalibrated:
        raise SystemExit(f"{label}: enabled quantizers without an encoding: {uncalibrated}")
    with torch.no_grad():
        ref, out = model(x), sim.model(x)
    if torch.equal(out, ref):
        raise SystemExit(f"{label}: sim.model output equals the FP32 output: nothing is quantized")
    db = sqnr_db(out, ref)
    if db < SQNR_FLOOR_DB:
        raise SystemExit(f"{label}: sim.model output SQNR {db:.1f} dB against FP32, below the "
                         f"{SQNR_FLOOR_DB:.0f} dB floor: the sim does not quantize faithfully")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    rows = []
    for name, model in (("MobileNetV2-style", mobilenet_ish()), ("ResNet-style", resnet_ish())):
        model.eval()
        data = [torch.randn(32, 3, 64, 64) for _ in range(args.batches)]
        x = data[0]
        sim = rq.QuantSim(model, x, rq.QuantSimConfig())
        sim.compute_encodings(data[:1], show_progress=False)  # warm-up
        check_sim_quantizes(f"{name}, eval-forward sim", model, sim, x)
        with torch.no_grad():
            cases = [Case("fp32", lambda: model(x), 0), Case("sim", lambda: sim.model(x), 0)]
            run_interleaved(cases, "cpu", rounds=9, min_time=0.05)
        fp, sm = cases[0].median, cases[1].median
        for scheme in ("minmax", "percentile", "mse", "sqnr", "entropy"):
            cfg = rq.QuantSimConfig(act_scheme=scheme, param_scheme="minmax" if scheme == "entropy" else scheme)
            sim_s = rq.QuantSim(model, x, cfg)
            t0 = time.perf_counter()
            sim_s.compute_encodings(data, show_progress=False)
            dt = time.perf_counter() - t0
            check_sim_quantizes(f"{name}, calibrated with {scheme}", model, sim_s, x)  # before reporting its time
            rows.append({"model": name, "what": f"calibrate {scheme} ({args.batches} batches of 32)",
                         "time": f"{dt:.3f} s", "ratio": f"{dt / (args.batches * fp):.2f}x FP32 passes"})
        rows.append({"model": name, "what": "eval forward, FP32 model (batch 32)", "time": f"{fp * 1e3:.2f} ms", "ratio": "1.00"})
        rows.append({"model": name, "what": f"eval forward, sim.model ({len(sim.quantizers())} quantizers)",
                     "time": f"{sm * 1e3:.2f} ms", "ratio": f"{sm / fp:.2f}"})
    title = f"QuantSim on {machine_line('cpu')}; rapidquant {rq.__version__}"
    print(write_table(rows, os.path.join(args.out, "quantsim_cpu"), title))


if __name__ == "__main__":
    main()

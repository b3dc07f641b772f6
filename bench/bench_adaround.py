"""AdaRound: our defaults vs AIMET's defaults implemented with plain torch ops.

    python bench/bench_adaround.py [--bits 3] [--threads N] [--quick]

Models: a ResNet-style and a MobileNetV2-style CNN trained here on scikit-learn's digits
(real handwritten digits, 16x16). Per model: accuracy with round-to-nearest weights, with
AdaRound using rapidquant's defaults (fused kernel, lr 2e-2, <= 500 iterations per layer
with early stop), and with AIMET's defaults (10k iterations per layer, 32-row batches,
Adam lr 1e-3, no early stop) computed with torch autograd. Activations at 8 bits; weights
per channel. BN folded first, as AutoQuant does. Each result is checked before it is
reported: some weights rounded away from nearest, and all rounded weights on the grid of
the frozen encodings (SystemExit otherwise).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, write_table  # noqa: E402

import rapidquant as rq  # noqa: E402
from rapidquant import zoo  # noqa: E402


def quantized_sim(model, bits, encodings=None):
    x = zoo.calibration_batches(1)[0]
    sim = rq.QuantSim(model, x, rq.QuantSimConfig(param_bw=bits, act_bw=8, per_channel=True))
    if encodings is not None:
        encodings.apply_to(sim)
    sim.compute_encodings(zoo.calibration_batches(), show_progress=False)
    return sim


def quantized_accuracy(model, bits, encodings=None):
    return zoo.accuracy(quantized_sim(model, bits, encodings).model)


def _differs(a, w):
    """Mask of the elements where a differs from the weights w (beyond float rounding)."""
    return (a - w).abs() > 1e-5 * w.abs().max()


def check_weights_on_grid(label, r, sim):
    """SystemExit unless every weight AdaRound rounded is, in r.model, a dequantized value of
    the encoding r froze (sim: built on r.model with r applied)."""
    # the accuracy row scores r.model in a sim; weights off the frozen grid would be re-rounded there
    params = sim.parameters_quantized()
    for name in r.float_weights:
        q, w = sim.quantizer(name), params[name].detach()
        if not q.frozen or q.encoding["scale"] != r.encodings["quantizers"][name]["scale"]:
            raise SystemExit(f"{label}: {name}: the sim does not hold AdaRound's frozen encoding")
        off = int(_differs(q(w), w).sum())  # quantize-dequantize moves only weights off the grid
        if off:
            raise SystemExit(f"{label}: {name}: {off} of {w.numel()} weights of the "
                             f"returned model are not on the grid of the frozen encoding")


def check_rounding_changed(label, r, sim):
    """SystemExit unless some rounded weight of r.model differs from round-to-nearest of the
    float weights on the same frozen grid (sim: built on r.model with r applied)."""
    # no flip at all means AdaRound learned nothing and its time buys nothing
    params = sim.parameters_quantized()
    flipped = total = 0
    for name, w_float in r.float_weights.items():
        q, w = sim.quantizer(name), params[name].detach()
        flipped += int(_differs(q(w_float), w).sum())  # q(w_float): round-to-nearest
        total += w.numel()
    if not r.float_weights or flipped == 0:
        raise SystemExit(f"{label}: AdaRound changed no rounding ({flipped} of {total} weights differ from "
                         f"nearest over {len(r.float_weights)} layers)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="AIMET reference with 2000 instead of 10000 iterations")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = []
    ref_iters = 2000 if args.quick else 10000
    for name, make in (("ResNet-style", zoo.DigitsResNet), ("MobileNetV2-style", zoo.DigitsMobileNet)):
        model = zoo.train(make())
        rq.fold_batch_norms_(model)
        fp = zoo.accuracy(model)
        x = zoo.calibration_batches(1)[0]
        data = zoo.calibration_batches(16)
        rows.append({"model": name, "method": "FP32", "accuracy": f"{fp:.4f}", "AdaRound time": "",
                     "iterations": "", "speed-up": ""})
        rows.append({"model": name, "method": f"W{args.bits}A8 round-to-nearest",
                     "accuracy": f"{quantized_accuracy(model, args.bits):.4f}", "AdaRound time": "",
                     "iterations": "", "speed-up": ""})
        ours_cfg = rq.AdaRoundConfig(param_bw=args.bits, per_channel=True, num_batches=16)
        aimet_cfg = rq.AdaRoundConfig(param_bw=args.bits, per_channel=True, num_batches=16, iterations=ref_iters,
                                      lr=1e-3, early_stop=False, use_reference_math=True)
        res = {}
        for label, cfg in (("AIMET defaults (torch ops)", aimet_cfg), ("rapidquant defaults", ours_cfg)):
            t0 = time.perf_counter()
            r = rq.adaround(model, x, data, cfg, show_progress=False)
            dt = time.perf_counter() - t0
            res[label] = dt
            sim = quantized_sim(r.model, args.bits, r)
            check_rounding_changed(f"{name}, {label}", r, sim)  # before reporting its time
            check_weights_on_grid(f"{name}, {label}", r, sim)
            acc = zoo.accuracy(sim.model)
            rows.append({"model": name, "method": f"W{args.bits}A8 AdaRound, {label}", "accuracy": f"{acc:.4f}",
                         "AdaRound time": f"{dt:.1f} s", "iterations": str(sum(l.iterations for l in r.layers)),
                         "speed-up": ""})
        rows[-1]["speed-up"] = f"{res['AIMET defaults (torch ops)'] / res['rapidquant defaults']:.1f}x"
    title = f"AdaRound on {machine_line('cpu')}; rapidquant {rq.__version__}"
    print(write_table(rows, os.path.join(args.out, "adaround_cpu"), title))


if __name__ == "__main__":
    main()

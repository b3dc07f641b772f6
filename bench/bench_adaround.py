"""AdaRound: our defaults vs AIMET's recipe re-implemented in torch, and vs aimet-torch itself.

    python bench/bench_adaround.py [--bits 3] [--threads N] [--quick]
        [--aimet-python V/bin/python [--aimet-iters same,default]] [--models resnet,mobilenet]

Models: a ResNet-style and a MobileNetV2-style CNN trained here on scikit-learn's digits
(real handwritten digits, 16x16). Per model: accuracy (397 test images) and logit SQNR
against the float model with round-to-nearest weights, with AdaRound using rapidquant's
defaults (fused kernel, lr 2e-2, <= 500 iterations per layer with early stop), and with
AIMET's recipe re-implemented in torch by rapidquant (10k iterations per layer, 32-row
batches, Adam lr 1e-3, no early stop, torch autograd; not AIMET's code). Activations at 8
bits; weights per channel. BN folded first, as AutoQuant does. Each result is checked before
it is reported: some weights rounded away from nearest, and all rounded weights on the grid
of the frozen encodings (SystemExit otherwise).

With --aimet-python, the real aimet-torch runs too, in its own environment (it does not
install beside rapidquant's torch): this script writes the BN-folded model (state_dict + a
copy of the plain-torch architecture file), the same AdaRound and calibration batches and
the test set to a temporary folder, and bench/aimet_worker.py runs AIMET's
Adaround.apply_adaround there (same bitwidths and batches; per layer the same iteration cap
as our row with "same", AIMET's own default with "default"; AIMET's defaults otherwise),
then AIMET's QuantizationSimModel with the AdaRound encodings frozen, and scores the same
test images. The worker checks that the rebuilt model reproduces our float logits exactly
before timing, and the AdaRound result (on the frozen grid, some weights flipped) after.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

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


def test_logits(model):
    with torch.no_grad():
        return model(zoo.digits_splits()[1][0])


def sqnr_db(q, f):
    """Logit SQNR of q against the float logits f, in dB."""
    err = float(((q - f) ** 2).sum())
    return float("inf") if err == 0 else 10 * math.log10(float((f ** 2).sum()) / err)


def scores(model, fp_logits):
    """(accuracy, logit SQNR in dB) of a (quantized) model on the test images."""
    return zoo.accuracy(model), sqnr_db(test_logits(model), fp_logits)


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


AIMET_MISSING = ("aimet-torch not available: create a venv with `python3 -m venv V && V/bin/pip install "
                 "torch==2.13.0 aimet-torch==2.42.0` and pass --aimet-python V/bin/python (if pip finds no "
                 "torchvision for torch 2.13, drop the torch pin: the worker runs in its own process, and the "
                 "table's title names the torch it used)")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "aimet_worker.py")
MODELS = {"resnet": ("ResNet-style", zoo.DigitsResNet), "mobilenet": ("MobileNetV2-style", zoo.DigitsMobileNet)}


def aimet_version(python):
    """aimet-torch's version under `python`, or None (with the reason printed)."""
    if not python:
        print(AIMET_MISSING)
        return None
    try:
        p = subprocess.run([python, "-c", "import torch, aimet_torch; print(aimet_torch.__version__, torch.__version__)"],
                           capture_output=True, text=True, timeout=300)
    except OSError as e:
        print(f"{AIMET_MISSING} ({python}: {e})")
        return None
    if p.returncode:
        print(f"{AIMET_MISSING} ({python}: {(p.stderr.strip().splitlines() or ['?'])[-1]})")
        return None
    return p.stdout.split()


def write_aimet_inputs(d, model, ada_batches, fp_logits):
    """What aimet_worker.py needs, in folder d: the architecture as plain torch source, the folded
    weights, the AdaRound / calibration batches, the test set and our float logits on it."""
    src = inspect.getsourcefile(type(model))
    text = open(src).read()
    if re.search(r"^\s*(import|from)\s+rapidquant", text, re.M):
        raise SystemExit(f"{src} imports rapidquant: aimet_worker.py needs a plain-torch definition")
    shutil.copy(src, os.path.join(d, "model_source.py"))
    torch.save({"state_dict": model.state_dict(),
                "identity": [n for n, m in model.named_modules() if isinstance(m, nn.Identity)],
                "biased": [n for n, m in model.named_modules()
                           if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]},
               os.path.join(d, "model.pt"))
    (_, _), (x_test, y_test) = zoo.digits_splits()
    torch.save({"adaround": list(ada_batches), "calib": zoo.calibration_batches(), "x_test": x_test,
                "y_test": y_test, "fp_logits": fp_logits}, os.path.join(d, "data.pt"))


def run_aimet(python, d, cls, bits, num_batches, iterations, threads):
    """aimet_worker.py's result dict, or a short reason it failed (the whole log is printed)."""
    tag = "default" if iterations is None else str(iterations)
    spec = {"model_source": os.path.join(d, "model_source.py"), "class": cls, "model_file": os.path.join(d, "model.pt"),
            "data_file": os.path.join(d, "data.pt"), "param_bw": bits, "act_bw": 8, "num_batches": num_batches,
            "iterations": iterations, "threads": threads, "out": os.path.join(d, f"result_{tag}.json")}
    with open(os.path.join(d, f"spec_{tag}.json"), "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    p = subprocess.run([python, WORKER, os.path.join(d, f"spec_{tag}.json")], capture_output=True, text=True, env=env)
    if p.returncode:
        print(f"aimet_worker.py failed ({cls}, iterations {tag}):\n{p.stdout[-2000:]}{p.stderr[-6000:]}")
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return f"failed: {last[:120]}"
    with open(spec["out"]) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true",
                    help="AIMET's recipe re-implemented with 2000 instead of 10000 iterations")
    ap.add_argument("--models", default="resnet,mobilenet", help="comma-separated: resnet, mobilenet")
    ap.add_argument("--aimet-python", default=None,
                    help="python of a venv with aimet-torch (e.g. V/bin/python): adds aimet-torch's own AdaRound")
    ap.add_argument("--aimet-iters", default="same",
                    help="comma-separated iterations per layer for the aimet-torch rows: 'same' (our cap), "
                         "'default' (AIMET's own: 15000 below 8-bit weights, else 10000) or a number")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    aimet = aimet_version(args.aimet_python)
    rows = []
    ref_iters = 2000 if args.quick else 10000
    reimpl = "AIMET's recipe re-implemented in torch"
    ours_label = "rapidquant defaults"
    for key in args.models.split(","):
        name, make = MODELS[key.strip()]
        torch.manual_seed(0)  # the initial weights: zoo.train seeds only its own steps (torch seeds itself randomly)
        model = zoo.train(make())
        rq.fold_batch_norms_(model)
        fp = zoo.accuracy(model)
        fp_logits = test_logits(model)
        x = zoo.calibration_batches(1)[0]
        data = zoo.calibration_batches(16)

        def row(method, acc, sqnr="", t="", iters="", speed=""):
            return {"model": name, "method": method, "accuracy": acc if isinstance(acc, str) else f"{acc:.4f}",
                    "logit SQNR (dB)": sqnr if isinstance(sqnr, str) else f"{sqnr:.1f}",
                    "AdaRound time": t, "iterations": iters, "speed-up": speed}

        rows.append(row("FP32", fp))
        rows.append(row(f"W{args.bits}A8 round-to-nearest", *scores(quantized_sim(model, args.bits).model, fp_logits)))
        ours_cfg = rq.AdaRoundConfig(param_bw=args.bits, per_channel=True, num_batches=16)
        aimet_cfg = rq.AdaRoundConfig(param_bw=args.bits, per_channel=True, num_batches=16, iterations=ref_iters,
                                      lr=1e-3, early_stop=False, use_reference_math=True)
        res = {}
        for label, cfg in ((reimpl, aimet_cfg), (ours_label, ours_cfg)):
            if label == ours_label and aimet:
                rows.extend(aimet_rows(args, aimet, name, model, data, fp_logits, ours_cfg, res))
            t0 = time.perf_counter()
            r = rq.adaround(model, x, data, cfg, show_progress=False)
            dt = time.perf_counter() - t0
            res[label] = dt
            sim = quantized_sim(r.model, args.bits, r)
            check_rounding_changed(f"{name}, {label}", r, sim)  # before reporting its time
            check_weights_on_grid(f"{name}, {label}", r, sim)
            rows.append(row(f"W{args.bits}A8 AdaRound, {label}", *scores(sim.model, fp_logits), f"{dt:.1f} s",
                            str(sum(l.iterations for l in r.layers))))
        speed = [f"{res[reimpl] / res[ours_label]:.1f}x vs re-implementation"]
        speed += [f"{res[k] / res[ours_label]:.1f}x vs {k}" for k in res if k.startswith("aimet-torch")]
        rows[-1]["speed-up"] = "; ".join(speed)
    title = (f"AdaRound on {machine_line('cpu')}; rapidquant {rq.__version__}"
             + (f"; aimet-torch {aimet[0]} (torch {aimet[1]}) in {args.aimet_python}" if aimet else "; aimet-torch not run"))
    print(write_table(rows, os.path.join(args.out, "adaround_cpu"), title))


def aimet_rows(args, aimet, name, model, data, fp_logits, ours_cfg, times):
    """aimet-torch's rows for one model (times[label] gets each AdaRound time)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_adaround_aimet_") as d:
        write_aimet_inputs(d, model, data, fp_logits)
        for it in args.aimet_iters.split(","):
            it = it.strip()
            iterations = ours_cfg.iterations if it == "same" else None if it == "default" else int(it)
            what = ("same cap as ours" if it == "same" else "AIMET's default" if it == "default" else "")
            r = run_aimet(args.aimet_python, d, type(model).__name__, args.bits, ours_cfg.num_batches,
                          iterations, args.threads)
            if isinstance(r, str):
                rows.append({"model": name, "method": f"W{args.bits}A8 AdaRound, aimet-torch {aimet[0]} ({it})",
                             "accuracy": r, "logit SQNR (dB)": "", "AdaRound time": "", "iterations": "",
                             "speed-up": ""})
                continue
            label = f"aimet-torch {aimet[0]}, {r['iterations_per_layer']}/layer"
            print(f"{name}, {label}: {r['flipped']} of {r['weights']} weights rounded away from nearest; "
                  f"{r['soft']} returned between grid points (AIMET folds its soft rounding into the weights; "
                  f"the frozen quantizer rounds them, as hard rounding would)")
            times[label] = r["adaround_seconds"]
            rows.append({"model": name,
                         "method": f"W{args.bits}A8 AdaRound, aimet-torch {aimet[0]}"
                                   f" ({r['iterations_per_layer']} it/layer{', ' + what if what else ''})",
                         "accuracy": f"{r['accuracy']:.4f}", "logit SQNR (dB)": f"{r['logit_sqnr_db']:.1f}",
                         "AdaRound time": f"{r['adaround_seconds']:.1f} s", "iterations": str(r["iterations"]),
                         "speed-up": ""})
    return rows


if __name__ == "__main__":
    main()

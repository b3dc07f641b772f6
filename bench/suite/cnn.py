"""Small CNNs with labelled test sets: the digits models shipped in rapidquant.zoo, and the
same two architectures trained on Fashion-MNIST (bench/train_fashion.py)."""
from __future__ import annotations

import copy
import tempfile

import numpy as np
import torch

import rapidquant as rq
from rapidquant import zoo
from rapidquant.zoo import fashion

from . import aimet
from .table import Timer, row


def _ort_accuracy(path, x, y):
    """Accuracy of the exported file in onnxruntime with default session options (what a user runs)."""
    from rapidquant.export import OnnxRuntimeModule
    m = OnnxRuntimeModule(path)
    out = np.concatenate([m(x[i:i + 256]).numpy() for i in range(0, len(x), 256)])
    return float((out.argmax(1) == y.numpy()).mean())


def adaround_w4(fp, calib, iterations=None):
    """BN fold + AdaRound W4 per-channel weights, then a W4A8 sim: returns its model."""
    folded = copy.deepcopy(fp)
    rq.fold_batch_norms_(folded)
    cfg = rq.AdaRoundConfig(param_bw=4) if iterations is None else rq.AdaRoundConfig(param_bw=4,
                                                                                    iterations=iterations)
    ada = rq.adaround(folded, calib[0], calib, cfg, show_progress=False)
    sim = rq.QuantSim(ada.model, calib[0], rq.QuantSimConfig(param_bw=4, act_bw=8))
    ada.apply_to(sim)
    sim.compute_encodings(calib, show_progress=False)
    return sim.model


def cnn_case(name, fp, calib, evaluate, test_xy, ada_iters=None, aq_drop=0.01):
    f = evaluate(fp)
    row(name, "FP32", f, f, 0)
    iters = ada_iters or rq.AdaRoundConfig().iterations
    for bw in (8, 4):
        with Timer() as t:
            sim = rq.QuantSim(fp, calib[0], rq.QuantSimConfig(param_bw=bw, act_bw=8))
            sim.compute_encodings(calib, show_progress=False)
        a = aimet.run("quantsim", lambda: aimet.quantsim(fp, calib[0], calib, bw, 8, per_channel=True), evaluate)
        row(name, f"W{bw}A8 per-channel, nearest", evaluate(sim.model), f, t.seconds, aimet=a)
    with Timer() as t:
        model = adaround_w4(fp, calib, ada_iters)
    a = aimet.run("adaround", lambda: aimet.adaround(fp, calib[0], calib, 4, True, iters, len(calib)), evaluate)
    row(name, "W4A8 per-channel, BN fold + AdaRound", evaluate(model), f, t.seconds, f"{iters} it/layer",
        aimet=a)
    with tempfile.TemporaryDirectory() as d, Timer() as t:
        res = rq.AutoQuant(fp, calib[0], calib, lambda m, n=None: evaluate(m),
                           rq.AutoQuantConfig(sim=rq.QuantSimConfig(param_bw=4, act_bw=8, per_channel=False), allowed_drop=aq_drop, results_dir=d,
                                              adaround=rq.AdaRoundConfig(iterations=iters)),
                           show_progress=False).optimize()
        ort = _ort_accuracy(res.onnx_path, *test_xy) if res.onnx_path else None
    row(name, f"AutoQuant W4A8 per-tensor, drop {aq_drop}", res.score, f, t.seconds,
        f"met={res.met} at {res.best_stage}", ort,
        aimet=aimet.run("autoquant", lambda: aimet.autoquant(fp, calib[0], calib, evaluate, 4, False, aq_drop, iters,
                                                             len(calib))))
    return model


def digits_case(quick: bool):
    calib = zoo.calibration_batches(16)
    test = zoo.digits_splits()[1]
    for name in ("digits_resnet", "digits_mobilenet"):
        cnn_case(name, zoo.pretrained(name), calib, zoo.accuracy, test)


def digits_determinism_check():
    """Rebuild one AdaRound row from scratch: its score must be identical."""
    calib = zoo.calibration_batches(16)
    return f"{zoo.accuracy(adaround_w4(zoo.pretrained('digits_mobilenet'), calib)):.4f}"


def fashion_case(quick: bool):
    if not fashion.available():
        print(f"  fashion: skipped ({fashion.INSTALL_HINT})")
        return
    from train_fashion import load  # bench/ is on sys.path (run_suite.py)
    n = 2000 if quick else None
    _, (x, y) = fashion.splits()
    test = (x[:n], y[:n])
    calib = fashion.calibration_batches(16)
    for name in ("fashion_resnet", "fashion_mobilenet"):
        try:
            fp = load(name)
        except FileNotFoundError as e:
            print(f"  {name}: skipped ({e})")
            continue
        cnn_case(name + (" (2k test)" if quick else ""), fp, calib, lambda m: fashion.accuracy(m, n), test,
                 ada_iters=100 if quick else None)

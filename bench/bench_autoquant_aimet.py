"""AutoQuant against aimet-torch 2.30's AutoQuant on the same work, side by side.

    python bench/bench_autoquant_aimet.py [--cases digits,fashion,mobilenetv2] [--repeats 2] [--threads 2]

Run it in the AIMET environment of bench/README.md ("Side by side with AIMET"): aimet-torch
2.30 importable beside rapidquant. Per case, both tools get the same model, calibration
batches, eval function, weight/activation bitwidths, allowed drop, AdaRound iterations and
batches (and AMP candidates on MobileNetV2). Our latency measurement is off here
(`latency_threads=None`): AIMET does not time files, so it would be work only one side does.
Both exporters are imported and run once on a tiny model before anything is timed (the first
torch.onnx export of a process pays for importing the exporter). The two tools alternate,
first one then the other, over `--repeats` rounds; the table gives each one's median wall
time, our eval_fn calls and calibration passes, our score (the exported ONNX file in
onnxruntime with default options: what AutoQuant reports) and AIMET's (its QuantSim's, the
only score its AutoQuant returns; its file is a float ONNX model plus an encodings JSON).
Checks before timing: our run must have exported a file whose onnxruntime score it reports.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, write_table  # noqa: E402
from suite import aimet  # noqa: E402

import rapidquant as rq  # noqa: E402
from rapidquant import zoo  # noqa: E402


def digits_cases():
    calib = zoo.calibration_batches(16)
    for name in ("digits_resnet", "digits_mobilenet"):
        yield dict(name=name, model=zoo.pretrained(name), calib=calib, dummy=calib[0],
                   evaluate=zoo.accuracy, bw=(4, 8), drop=0.01, iterations=500, ada_batches=16)


def fashion_cases():
    from rapidquant.zoo import fashion
    if not fashion.available():
        print(f"fashion: skipped ({fashion.INSTALL_HINT})")
        return
    from train_fashion import load
    calib = fashion.calibration_batches(16)
    for name in ("fashion_resnet", "fashion_mobilenet"):
        yield dict(name=name + " (2k test)", model=load(name), calib=calib, dummy=calib[0],
                   evaluate=lambda m: fashion.accuracy(m, 2000), bw=(4, 8), drop=0.01, iterations=100,
                   ada_batches=16)


def mobilenet_cases():
    from rapidquant.zoo import imagenet as I
    from suite.mobilenet import Fidelity
    try:
        fp = I.pretrained_mobilenet_v2()
    except ImportError as e:
        print(f"mobilenetv2: skipped ({e})")
        return
    fid = Fidelity(fp, I.fidelity_crops(256, "evaluation"))
    calib = list(I.fidelity_crops(64, "calibration").split(16))
    yield dict(name="mobilenetv2 (confident-crop agreement)", model=fp, calib=calib, dummy=calib[0],
               evaluate=fid.score, bw=(8, 8), drop=0.01, iterations=20, ada_batches=2,
               amp=("W8A8", "W16A16"))


def minilm_cases():
    """all-MiniLM-L6-v2 (a transformer encoder: token ids and a mask in, hidden states out),
    scored by summary -> body retrieval recall@1 over 192 stdlib docstring pairs (the suite's
    quick setting). AIMET gets a quantized definition of its masked softmax and runs without
    its model preparer, whose fx trace fails on it (the softmax reads scores.dtype), as the
    suite's AIMET QuantSim does."""
    from rapidquant.zoo import minilm as L
    from suite.minilm import retrieval_task
    try:
        fp, qs, ds, calib = retrieval_task(quick=True)
    except ImportError as e:
        print(f"minilm: skipped ({e})")
        return
    if aimet.available():
        aimet.teach_minilm()
    yield dict(name="all-MiniLM-L6-v2 (recall@1)", model=fp, calib=calib, dummy=calib[0],
               evaluate=lambda m: L.retrieval_recall(L.embed(m, qs), L.embed(m, ds)), bw=(8, 8), drop=0.01,
               iterations=20, ada_batches=4, aimet_prepare=False)


CASES = {"digits": digits_cases, "fashion": fashion_cases, "mobilenetv2": mobilenet_cases, "minilm": minilm_cases}


def ours(case):
    """(score of our exported file, seconds, result)."""
    w, a = case["bw"]
    with tempfile.TemporaryDirectory() as d:
        cfg = rq.AutoQuantConfig(sim=rq.QuantSimConfig(param_bw=w, act_bw=a, per_channel=False),
                                 allowed_drop=case["drop"], results_dir=d, latency_threads=None,
                                 num_calibration_batches=len(case["calib"]),
                                 adaround=rq.AdaRoundConfig(iterations=case["iterations"],
                                                            num_batches=case["ada_batches"]),
                                 amp_candidates=case.get("amp"))
        t0 = time.perf_counter()
        res = rq.AutoQuant(case["model"], case["dummy"], case["calib"], lambda m, n=None: case["evaluate"](m),
                           cfg, show_progress=False).optimize()
        seconds = time.perf_counter() - t0
    if res.onnx_path is None or res.artifact_check != "onnxruntime":
        raise SystemExit(f"{case['name']}: our run did not score an exported file ({res.artifact_check})")
    return res.score, seconds, res


def theirs(case):
    """(AIMET's score, or why it gave none, and its seconds)."""
    w, a = case["bw"]
    ran = {}

    def go():
        out = aimet.autoquant(case["model"], case["dummy"], case["calib"], case["evaluate"], w, False, case["drop"],
                              case["iterations"], case["ada_batches"], case.get("amp"),
                              prepare=case.get("aimet_prepare", True))
        ran["seconds"] = out[1]
        return out
    out = aimet.run("autoquant", go)
    if isinstance(out, str) and "seconds" in ran:  # it ran to the end without a result (W32 missed)
        return out, ran["seconds"]
    if not isinstance(out, tuple):
        raise SystemExit(f"{case['name']}: aimet-torch's AutoQuant did not run: {out or aimet.why()}")
    return out


def warm_exporters():
    """One export through each tool on a tiny model: the exporters' imports are not timed."""
    from rapidquant.export import OnnxRuntimeModule  # noqa: F401
    tiny = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
    x = torch.randn(1, 1, 8, 8)
    with tempfile.TemporaryDirectory() as d:
        sim = rq.QuantSim(tiny, x)
        sim.compute_encodings([x], show_progress=False)
        sim.export(d, x, "tiny")
        s, _ = aimet.make_sim(tiny, x, [x])
        with aimet._quiet():
            s.export(d, "tiny_aimet", x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if not aimet.available():
        raise SystemExit(aimet.why() + "; see bench/README.md, 'Side by side with AIMET'")
    warm_exporters()
    rows = []
    for key in args.cases.split(","):
        for case in CASES[key]():
            mine, other, res = [], [], None
            for r in range(args.repeats):  # alternate which goes first
                order = (("ours", ours), ("aimet", theirs)) if r % 2 == 0 else (("aimet", theirs), ("ours", ours))
                for who, fn in order:
                    out = fn(case)
                    (mine if who == "ours" else other).append(out)
                    if who == "ours":
                        res = out[2]
                    print(f"  {case['name']} {who}: score {out[0]!s:.6} in {out[1]:.1f} s", flush=True)
            t_ours = statistics.median(o[1] for o in mine)
            t_aimet = statistics.median(o[1] for o in other)
            score_a = other[-1][0]
            rows.append({"case": case["name"],
                         "setting": f"W{case['bw'][0]}A{case['bw'][1]} per-tensor, drop {case['drop']}, "
                                    f"{case['iterations']} AdaRound it/layer"
                                    + (f", AMP {'/'.join(case['amp'])}" if case.get("amp") else ""),
                         "rapidquant score (file)": f"{mine[-1][0]:.4f} ({'met' if res.met else 'missed'} at "
                                                    f"{res.best_stage})",
                         "aimet score": score_a if isinstance(score_a, str) else f"{score_a:.4f}",
                         "rapidquant s": f"{t_ours:.1f}", "aimet s": f"{t_aimet:.1f}",
                         "speed-up": f"{t_aimet / t_ours:.1f}x" + (" (AIMET: no result)" if isinstance(score_a, str)
                                                                   else ""),
                         "our eval_fn calls / calibrations": f"{res.evaluations} / {res.calibrations}",
                         "runs": f"ours {', '.join(f'{o[1]:.1f}' for o in mine)}; "
                                 f"aimet {', '.join(f'{o[1]:.1f}' for o in other)}"})
    title = (f"AutoQuant vs aimet-torch {aimet.available()} on {machine_line('cpu')}, {args.threads} threads; "
             f"rapidquant {rq.__version__}")
    print(write_table(rows, os.path.join(args.out, "autoquant_vs_aimet"), title))


if __name__ == "__main__":
    main()

"""AutoQuant end to end on the two shipped digits CNNs.

    python bench/bench_autoquant.py [--threads N]

For each model and setting: final score, FP32 score, the stage that met the target, the
time of every stage and the total. Fresh results directory per run (no cache).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
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
                         "stopped at": res.best_stage, "total s": f"{res.seconds:.1f}", "stage times (s)": times})
    title = f"AutoQuant on {machine_line('cpu')}; rapidquant {rq.__version__}"
    print(write_table(rows, os.path.join(args.out, "autoquant_cpu"), title))


if __name__ == "__main__":
    main()

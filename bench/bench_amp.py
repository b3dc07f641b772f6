"""AMP phase 1: shared calibration statistics vs recalibrating for every candidate.

    python bench/bench_amp.py [--threads N] [--batches B]

On the MobileNetV2-style digits CNN (tens of Conv/Linear layers, BN folded) with candidates
W4A8 / W8A8 / W8A16 / W16A16: phase 1 scores every quantizer group at every non-baseline
candidate by the SQNR of the model output on 4 batches. rapidquant derives each
candidate's encodings from one calibration pass (statistics do not depend on the
bitwidth); the comparison recalibrates the sim before every phase-1 evaluation, as a
flow without shared statistics must. Proxy scores within 1 dB of each other (checked:
recalibrating at a lower weight bitwidth shifts downstream activation statistics a little).
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
from rapidquant.scoring import model_outputs, sqnr_db  # noqa: E402
from rapidquant.mixed_precision.groups import apply_candidate, find_groups, parse_candidate, snapshot  # noqa: E402


def phase1(sim, groups, cands, proxy, calib, recalibrate: bool):
    snap = snapshot(sim)
    with sim.disabled():
        ref = model_outputs(sim.model, proxy, 1)
    passes, scores = 0, {}
    t0 = time.perf_counter()
    for g in groups:
        for c in cands:
            for h in groups:
                apply_candidate(sim, h, None, snap)
            apply_candidate(sim, g, c, snap)
            if recalibrate:
                for q in sim.quantizers().values():
                    q.stats = None
                sim.compute_encodings(calib, show_progress=False)
                passes += 1
            outs = model_outputs(sim.model, proxy, 1)
            scores[(g.name, c.name)] = sum(sqnr_db(o, r) for o, r in zip(outs, ref)) / len(outs)
    return time.perf_counter() - t0, passes, scores


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batches", type=int, default=8, help="calibration batches of 32")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model = zoo.train(zoo.DigitsMobileNet())
    rq.fold_batch_norms_(model)
    calib = zoo.calibration_batches(args.batches)
    proxy = calib[:4]
    sim = rq.QuantSim(model, calib[0], rq.QuantSimConfig(per_channel=True))
    t0 = time.perf_counter()
    sim.compute_encodings(calib, show_progress=False)
    t_cal = time.perf_counter() - t0
    groups = find_groups(sim, sim.dummy_input)
    cands = [parse_candidate(c) for c in ("W4A8", "W8A8", "W8A16")]  # W16A16 is the baseline
    t_shared, p_shared, s_shared = phase1(sim, groups, cands, proxy, calib, recalibrate=False)
    t_re, p_re, s_re = phase1(sim, groups, cands, proxy, calib, recalibrate=True)
    worst = max(abs(s_shared[k] - s_re[k]) for k in s_shared)
    if worst >= 1.0:  # recalibrating at W4 shifts downstream activation statistics a little, no more
        raise SystemExit(f"shared statistics give proxy scores {worst:.3g} dB away from recalibrating (bench/README "
                         "says under 1 dB): the speed-up would compare different work")
    n = len(groups) * len(cands)
    rows = [
        {"phase 1 on": f"{len(groups)} groups x {len(cands)} candidates = {n} evaluations",
         "mode": "shared statistics (rapidquant)", "calibration passes": 1 + p_shared,
         "time": f"{t_shared + t_cal:.2f} s (incl. the one {t_cal:.2f} s calibration)", "speed-up": f"{t_re / (t_shared + t_cal):.1f}x"},
        {"phase 1 on": "", "mode": "recalibrate per evaluation", "calibration passes": p_re,
         "time": f"{t_re:.2f} s", "speed-up": "1.0x"},
    ]
    title = (f"AMP phase 1 on {machine_line('cpu')}; rapidquant {rq.__version__}; max proxy-score "
             f"difference between the modes {worst:.3g} dB")
    print(write_table(rows, os.path.join(args.out, "amp_cpu"), title))


if __name__ == "__main__":
    main()

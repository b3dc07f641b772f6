"""Scale-out: AMP phase 1 and calibration with 1 and 2 processes (gloo, one thread each).

    python bench/bench_distributed.py [--procs 2] [--batches B]

Model: the MobileNetV2-style digits CNN, W4A8 per-tensor, candidates W4A8/W8A8/W16A16,
64 calibration batches of 32. Processes are spawned here (no torchrun needed); on a
multi-GPU node launch your own script with torchrun instead, e.g.

    torchrun --nproc_per_node 8 my_quantize.py   # calls rq.AutoQuant / sim.compute_encodings / rq.amp

with torch.distributed.init_process_group("nccl") at its top: calibration shards batches
and all-reduces statistics, AMP phase 1 and the scheme candidates split their work items,
AdaRound all-reduces the rounding gradients, and only rank 0 writes files.

Before the table is written, every rank's encodings and gathered AMP phase-1 scores are
checked against the single process's (SystemExit otherwise).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_table  # noqa: E402


def _encodings(sim):
    return {n: None if q.scale is None else [q.scale.reshape(-1).tolist(), q.zero_point.reshape(-1).tolist()]
            for n, q in sim.quantizers().items()}


def check_same_encodings(one, many, procs):
    """SystemExit unless every rank of the distributed run calibrated exactly the encodings
    of the single process (minmax: all-reduced min/max are exact)."""
    # a speed-up of calibration that computes other encodings is no speed-up
    for rank, r in enumerate(many):
        diff = [n for n in one["encodings"] if r["encodings"].get(n) != one["encodings"][n]]
        if diff or r["encodings"].keys() != one["encodings"].keys():
            raise SystemExit(f"{procs} processes, rank {rank}: encodings differ from the single process "
                             f"for {len(diff)} quantizers, e.g. {diff[:3]}")


def check_same_phase1(one, many, procs, tol_db=1e-3):
    """SystemExit unless AMP phase-1 scores gathered on every rank equal the single process's
    (same (group, candidate) items, proxy SQNR within tol_db)."""
    # phase 1 split across ranks must score every item, and score it as one process would
    ref = {(g, c): s for g, c, s in one["phase1"]}
    for rank, r in enumerate(many):
        got = {(g, c): s for g, c, s in r["phase1"]}
        bad = [k for k in ref if k not in got or abs(got[k] - ref[k]) > tol_db]
        if bad or got.keys() != ref.keys():
            raise SystemExit(f"{procs} processes, rank {rank}: AMP phase-1 scores differ from the single "
                             f"process for {len(bad)} of {len(ref)} items, e.g. "
                             f"{[(k, got.get(k), ref[k]) for k in bad[:3]]}")


def work(rank, world, port, out, batches=86):
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import rapidquant as rq
    from rapidquant import zoo
    from rapidquant.mixed_precision.amp import amp
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = zoo.pretrained("digits_mobilenet")
    data = (zoo.calibration_batches(43) * 2)[:batches]  # 86 batches of 32 (cycling the training split)
    sim = rq.QuantSim(model, data[0], rq.QuantSimConfig(param_bw=4, per_channel=False))
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    sim.compute_encodings(data, show_progress=False)
    t_cal = time.perf_counter() - t0
    encodings = _encodings(sim)  # before AMP changes bitwidths
    res = amp(sim, ["W4A8", "W8A8", "W16A16"], lambda m: zoo.accuracy(m), 0.003, data, show_progress=False)
    with open(os.path.join(out, f"w{world}_r{rank}.json"), "w") as f:  # every rank: checked against 1 process
        json.dump({"calibration_s": t_cal, "batches": len(data), "phase1_s": res.phase1_seconds,
                   "items": len(res.phase1), "proxy_here": res.proxy_evaluations,
                   "encodings": encodings, "phase1": res.phase1}, f)
    if world > 1:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--batches", type=int, default=86, help="calibration batches of 32")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    for world in (1, args.procs):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(work, args=(world, port, tmp, args.batches), nprocs=world, start_method="spawn")
    one = json.load(open(os.path.join(tmp, "w1_r0.json")))
    ranks = [json.load(open(os.path.join(tmp, f"w{args.procs}_r{r}.json"))) for r in range(args.procs)]
    check_same_encodings(one, ranks, args.procs)  # before reporting any time
    check_same_phase1(one, ranks, args.procs)
    many = ranks[0]
    rows = []
    for label, r in (("1 process", one), (f"{args.procs} processes", many)):
        rows.append({"setup": label, "calibration": f"{r['calibration_s']:.2f} s "
                                                    f"({r['batches'] / r['calibration_s']:.0f} batches/s)",
                     "AMP phase 1": f"{r['phase1_s']:.2f} s ({r['items']} items, {r['proxy_here']} on rank 0)",
                     "phase-1 speed-up": f"{one['phase1_s'] / r['phase1_s']:.2f}x",
                     "calibration speed-up": f"{one['calibration_s'] / r['calibration_s']:.2f}x"})
    from common import machine_line as ml
    print(write_table(rows, os.path.join(args.out, "distributed_cpu"),
                      f"torch.distributed (gloo, 1 thread per process) on {ml('cpu')}"))


if __name__ == "__main__":
    main()

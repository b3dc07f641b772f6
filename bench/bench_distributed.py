"""Scale-out: AMP phase 1 and calibration with 1 and 2 processes (gloo, one thread each).

    python bench/bench_distributed.py [--procs 2]

Model: the MobileNetV2-style digits CNN, W4A8 per-tensor, candidates W4A8/W8A8/W16A16,
64 calibration batches of 32. Processes are spawned here (no torchrun needed); on a
multi-GPU node launch your own script with torchrun instead, e.g.

    torchrun --nproc_per_node 8 my_quantize.py   # calls rq.AutoQuant / sim.compute_encodings / rq.amp

with torch.distributed.init_process_group("nccl") at its top: calibration shards batches
and all-reduces statistics, AMP phase 1 and the scheme candidates split their work items,
AdaRound all-reduces the rounding gradients, and only rank 0 writes files.
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


def work(rank, world, port, out):
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import rapidquant as rq
    from rapidquant import zoo
    from rapidquant.mixed_precision.amp import amp
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = zoo.pretrained("digits_mobilenet")
    data = zoo.calibration_batches(43) * 2  # 86 batches of 32 (cycling the training split)
    sim = rq.QuantSim(model, data[0], rq.QuantSimConfig(param_bw=4, per_channel=False))
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    sim.compute_encodings(data, show_progress=False)
    t_cal = time.perf_counter() - t0
    res = amp(sim, ["W4A8", "W8A8", "W16A16"], lambda m: zoo.accuracy(m), 0.003, data, show_progress=False)
    if rank == 0:
        with open(os.path.join(out, f"w{world}.json"), "w") as f:
            json.dump({"calibration_s": t_cal, "batches": len(data), "phase1_s": res.phase1_seconds,
                       "items": len(res.phase1), "proxy_here": res.proxy_evaluations}, f)
    if world > 1:
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    for world in (1, args.procs):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(work, args=(world, port, tmp), nprocs=world, start_method="spawn")
    one, many = (json.load(open(os.path.join(tmp, f"w{w}.json"))) for w in (1, args.procs))
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

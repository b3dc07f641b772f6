"""Fixed costs around the rounding optimizations (AdaRound, block reconstruction) that are
not the model's arithmetic, before and after 2026-12-08's changes, side by side.

    python bench/bench_rounding_overheads.py [--threads 2] [--rounds 7] [--steps 2000]
                                             [--recon-iterations 1000] [--recon-rounds 3]

- **Optimizer step**: one Adam step over block reconstruction's three parameter groups
  (rounding variables of three convolutions, their biases, two activation log-steps), with
  `rapidquant.techniques.fused_adam.FusedAdam` against `torch.optim.Adam(fused=True)`, which
  it replaced; both call the same fused kernel. Checked before timing: after the same 50
  steps both leave the same parameters, bit for bit. Median microseconds per step over
  `--rounds` alternating rounds of `--steps` steps.
- **A fresh process's first op call**: the time of the first `rapidquant.ops.minmax` call
  in a new process, and of `import torch._dynamo` in a new process (what
  `torch.library.register_kernel`'s guard, and any torch.optim optimizer, made the first
  call pay before). Median over `--rounds` processes of each.
- **Block reconstruction with each optimizer**: `reconstruct_blocks` on the digits ResNet,
  W4A8 per-tensor, BNs folded, 16 calibration batches, `--recon-iterations` per block, no
  drop, in this one process, the two optimizers alternating over `--recon-rounds` rounds
  (dynamo is imported by the first torch.optim run: this is the steady state, not a first
  call). Checked after the timed rounds: both learned the same weights, bit for bit.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, write_table  # noqa: E402

import rapidquant as rq  # noqa: E402
from rapidquant.techniques.fused_adam import FusedAdam  # noqa: E402


def groups():
    g = torch.Generator().manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()
    return [{"params": [make(16, 16, 3, 3), make(16, 16, 3, 3), make(16, 8, 1, 1)], "lr": 5e-2},
            {"params": [make(16), make(16), make(16)], "lr": 1e-2},
            {"params": [make(()), make(())], "lr": 2e-3}]


class TorchAdam(torch.optim.Adam):
    """torch.optim.Adam(fused=True) behind FusedAdam's interface."""

    def __init__(self, groups):
        super().__init__(groups, fused=True)


OPTIMIZERS = {"FusedAdam": FusedAdam, "torch.optim.Adam(fused=True)": TorchAdam}


def alternating(rounds, fn):
    """{optimizer name: [fn(optimizer class) per round]}, the two taking turns going first."""
    out = {k: [] for k in OPTIMIZERS}
    for r in range(rounds):
        for k in list(OPTIMIZERS) if r % 2 == 0 else list(OPTIMIZERS)[::-1]:
            out[k].append(fn(OPTIMIZERS[k]))
    return out


def steps(opt_cls, n, seed=1):
    """(microseconds per step, final parameters) of n steps on fixed random gradients."""
    gs = groups()
    opt = opt_cls(gs)
    params = [p for g in gs for p in g["params"]]
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    t0 = time.perf_counter()
    for _ in range(n):
        opt.zero_grad()
        for p, grad in zip(params, grads):
            p.grad = grad
        opt.step()
    return (time.perf_counter() - t0) / n * 1e6, [p.detach().clone() for p in params]


FIRST_CALL = """
import sys, time, torch, rapidquant
x = torch.randn(64, 64)
t0 = time.perf_counter(); rapidquant.ops.minmax(x); t1 = time.perf_counter()
assert "torch._dynamo" not in sys.modules
import torch._dynamo
print(t1 - t0, time.perf_counter() - t1)
"""


def reconstruction(opt_cls, iterations):
    """(seconds, learned weights) of one block reconstruction with opt_cls as its optimizer."""
    from rapidquant import zoo
    from rapidquant.techniques import block_reconstruction as BR
    model = zoo.pretrained("digits_resnet")
    rq.fold_batch_norms_(model)
    calib = zoo.calibration_batches(16)
    sim_cfg = rq.QuantSimConfig(param_bw=4, act_bw=8, per_channel=False, hw_config="default")
    cfg = rq.BlockReconConfig(iterations=iterations, drop_prob=0.0, param_bw=4, per_channel=False,
                              hw_config="default")
    saved, BR.FusedAdam = BR.FusedAdam, opt_cls
    try:
        t0 = time.perf_counter()
        r = rq.reconstruct_blocks(model, calib[0], calib, cfg, sim_config=sim_cfg, show_progress=False)
        seconds = time.perf_counter() - t0
    finally:
        BR.FusedAdam = saved
    return seconds, [p.detach().clone() for p in r.model.parameters()]


def first_calls(rounds):
    calls, imports = [], []
    for _ in range(rounds):
        out = subprocess.run([sys.executable, "-c", FIRST_CALL], capture_output=True, text=True, check=True)
        a, b = map(float, out.stdout.split()[-2:])
        calls.append(a)
        imports.append(b)
    return calls, imports


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--recon-iterations", type=int, default=1000)
    ap.add_argument("--recon-rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    finals = [steps(cls, 50)[1] for cls in OPTIMIZERS.values()]  # checked before timing: the same steps
    if not all(torch.equal(a, b) for a, b in zip(*finals)):
        raise SystemExit("FusedAdam and torch.optim.Adam(fused=True) took different steps")
    times = {k: [t for t, _ in v] for k, v in alternating(args.rounds, lambda c: steps(c, args.steps)).items()}
    ours, theirs = (statistics.median(t) for t in times.values())
    rows = [{"what": f"Adam step ({k})", "median": f"{statistics.median(t):.1f} us",
             "runs": ", ".join(f"{x:.0f}" for x in t)} for k, t in times.items()]
    rows.append({"what": "Adam step: FusedAdam / torch.optim", "median": f"{ours / theirs:.2f}x", "runs": ""})
    calls, imports = first_calls(args.rounds)
    rows.append({"what": "first op call in a fresh process", "median": f"{statistics.median(calls) * 1e3:.1f} ms",
                 "runs": ", ".join(f"{t * 1e3:.1f}" for t in calls)})
    rows.append({"what": "import torch._dynamo in a fresh process", "median": f"{statistics.median(imports):.2f} s",
                 "runs": ", ".join(f"{t:.2f}" for t in imports)})
    runs = alternating(args.recon_rounds, lambda c: reconstruction(c, args.recon_iterations))
    if not all(torch.equal(a, b) for a, b in zip(*(v[0][1] for v in runs.values()))):
        raise SystemExit("block reconstruction learned different weights with the two optimizers")
    seconds = {k: [t for t, _ in v] for k, v in runs.items()}
    for k, ts in seconds.items():
        rows.append({"what": f"block reconstruction, {args.recon_iterations} it/block ({k})",
                     "median": f"{statistics.median(ts):.2f} s", "runs": ", ".join(f"{t:.2f}" for t in ts)})
    a, b = (statistics.median(ts) for ts in seconds.values())
    rows.append({"what": "block reconstruction: FusedAdam / torch.optim", "median": f"{a / b:.2f}x", "runs": ""})
    title = f"Rounding overheads on {machine_line('cpu')}; rapidquant {rq.__version__}"
    print(write_table(rows, os.path.join(args.out, "rounding_overheads"), title))


if __name__ == "__main__":
    main()

"""Scale-out on torch.distributed (launch with torchrun; gloo on CPU, nccl on GPUs).

Everything here is a no-op when torch.distributed is not initialized. Calibration shards
batches across ranks and combines statistics (min/max with MIN/MAX all-reduce, histograms
re-binned onto an agreed range and summed), so every rank ends with the same encodings;
AMP phase 1 and AutoQuant's scheme candidates split their work items across ranks;
AdaRound averages the gradient of the rounding variables across ranks each step. Only
rank 0 writes files. A failure on one rank inside a synchronized section is announced
to the others, which then raise instead of waiting.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def mine(i: int) -> bool:
    """Does work item / batch number i belong to this rank (round robin)?"""
    return i % world() == rank()


def _device() -> torch.device:
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce that also works for CPU tensors under nccl."""
    if not active():
        return t
    op = op or dist.ReduceOp.SUM
    dev = _device()
    buf = t if t.device == dev else t.to(dev)
    dist.all_reduce(buf, op=op)
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


def gather_objects(obj) -> list:
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def check_failures(error: BaseException | None, where: str) -> None:
    """Sync point: if any rank failed, every rank raises (the failing one its own error)."""
    if not active():
        if error is not None:
            raise error
        return
    flag = torch.tensor([1 if error is not None else 0], dtype=torch.int64)
    all_reduce(flag)
    if error is not None:
        raise error
    if int(flag) > 0:
        raise RuntimeError(f"{int(flag)} other rank(s) failed during {where}; stopping this rank too "
                           "(see the failing rank's traceback)")


def barrier() -> None:
    if active():
        dist.barrier()


def sync_observer_stats(quantizers) -> None:
    """Combine per-rank calibration statistics so all ranks hold the global ones."""
    from rapidquant.calibration import Stats, rebin
    if not active():
        return
    for q in quantizers:
        obs = q.observer
        if obs is None:
            continue
        st = obs.stats
        # 1. which ranks saw data, and the shapes (identical model -> identical shapes)
        have = torch.tensor([0 if st is None else 1], dtype=torch.int64)
        all_reduce(have)
        if int(have) == 0:
            continue
        shape = gather_objects(None if st is None else tuple(st.min.shape))
        shp = next(s for s in shape if s is not None)
        mn = st.min.clone() if st is not None else torch.full(shp, float("inf"))
        mx = st.max.clone() if st is not None else torch.full(shp, float("-inf"))
        all_reduce(mn, dist.ReduceOp.MIN)
        all_reduce(mx, dist.ReduceOp.MAX)
        batches = torch.tensor([0 if st is None else st.batches], dtype=torch.int64)
        all_reduce(batches)
        if st is None:
            st = obs.stats = Stats(mn, mx)
        else:
            st.min, st.max = mn, mx
        st.batches = int(batches)
        if not obs.histogram:
            continue
        # 2. histograms: agree on the union range, re-bin local counts onto it, sum
        hs = gather_objects(None if st.hist is None else (st.hist.shape[0]))
        G = next(h for h in hs if h is not None)
        lo = st.lo.clone() if st.hist is not None else torch.full((G,), float("inf"))
        hi = st.hi.clone() if st.hist is not None else torch.full((G,), float("-inf"))
        all_reduce(lo, dist.ReduceOp.MIN)
        all_reduce(hi, dist.ReduceOp.MAX)
        if st.hist is None:
            h = torch.zeros(G, obs.bins, dtype=torch.float64)
        else:
            h = rebin(st.hist, st.lo, st.hi, lo, hi)
        all_reduce(h)
        st.hist, st.lo, st.hi = h, lo, hi

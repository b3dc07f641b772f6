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
    """Combine per-rank calibration statistics so all ranks hold the global ones.

    Three collectives whatever the number of quantizers: a gather of what each rank holds
    (a rank that saw no batch for a quantizer learns its shapes), one MIN all-reduce of every
    range (maxima negated), then one SUM all-reduce of the batch counts and the histograms,
    each re-binned locally onto the agreed range first."""
    from rapidquant.calibration import Stats, rebin
    if not active():
        return
    obs = [q.observer for q in quantizers if q.observer is not None]
    local = [None if o.stats is None else
             (tuple(o.stats.min.shape), None if o.stats.hist is None else o.stats.hist.shape[0]) for o in obs]
    metas = []
    for held in zip(*gather_objects(local)):
        held = [m for m in held if m is not None]
        metas.append(None if not held else (held[0][0], next((g for _, g in held if g is not None), None)))
    live = [(o, m) for o, m in zip(obs, metas) if m is not None]  # quantizers no rank saw stay as they are

    def local_ranges(o, shp, G):
        st, inf = o.stats, (lambda n: torch.full((n,), float("inf"), dtype=torch.float64))
        n = torch.Size(shp).numel()
        out = [inf(n), inf(n)] if st is None else [st.min.double().flatten(), -st.max.double().flatten()]
        if o.histogram and G is not None:
            has = st is not None and st.hist is not None
            out += [st.lo.double(), -st.hi.double()] if has else [inf(G), inf(G)]
        return out

    ranges = all_reduce(torch.cat([t for o, (shp, G) in live for t in local_ranges(o, shp, G)]), dist.ReduceOp.MIN)
    sums, k = [], 0
    for o, (shp, G) in live:
        n = torch.Size(shp).numel()
        st = o.stats = o.stats or Stats(None, None)
        dtype = torch.float32 if st.min is None else st.min.dtype
        st.min, st.max = ranges[k:k + n].view(shp).to(dtype), (-ranges[k + n:k + 2 * n]).view(shp).to(dtype)
        k += 2 * n
        sums.append(torch.tensor([float(st.batches)], dtype=torch.float64))
        if o.histogram and G is not None:
            lo, hi = ranges[k:k + G].to(dtype), (-ranges[k + G:k + 2 * G]).to(dtype)
            k += 2 * G
            st.hist = (torch.zeros(G, o.bins, dtype=torch.float64) if st.hist is None
                       else rebin(st.hist, st.lo, st.hi, lo, hi))
            st.lo, st.hi = lo, hi
            sums.append(st.hist.flatten())
    total = all_reduce(torch.cat(sums))
    k = 0
    for o, (shp, G) in live:
        o.stats.batches = int(total[k])
        k += 1
        if o.histogram and G is not None:
            n = o.stats.hist.numel()
            o.stats.hist = total[k:k + n].view_as(o.stats.hist).clone()
            k += n

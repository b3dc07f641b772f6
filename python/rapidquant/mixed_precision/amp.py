"""Automatic mixed precision: phase 1 scores every quantizer group at every candidate with
a cheap proxy, phase 2 searches the Pareto front of relative BitOps vs the user's score."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from rapidquant import distributed as D
from rapidquant.fingerprint import data_hash, model_hash, obj_hash
from rapidquant.mixed_precision.groups import (
    Candidate, apply_candidate, bitops, find_groups, parse_candidate, snapshot,
)
from rapidquant.progress import progress


@dataclass
class ParetoPoint:
    rel_bitops: float
    score: float
    config: dict           # group name -> candidate name
    prefix: int = -1       # how many phase-1 entries were applied on top of the baseline


@dataclass
class AMPResult:
    pareto_front: list
    chosen: ParetoPoint | None
    baseline: str
    fp32_score: float
    target: float | None
    met: bool
    message: str
    phase1: list = field(default_factory=list)     # (group, candidate, proxy SQNR dB)
    evaluations: int = 0                            # calls of the user's eval_fn
    proxy_evaluations: int = 0                      # phase-1 proxy runs actually computed
    calibration_passes: int = 0
    phase1_seconds: float = 0.0
    phase2_seconds: float = 0.0
    plot_path: str | None = None


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    num = ref.double().pow(2).sum()
    den = (out.double() - ref.double()).pow(2).sum()
    if den == 0:
        return 200.0
    return float(10 * torch.log10(num / den))


def _outputs(model, batches, n_inputs):
    from rapidquant.quantsim import call_model
    outs = []
    with torch.no_grad():
        for b in batches:
            o = call_model(model, b, n_inputs)
            outs.append(o[0] if isinstance(o, (tuple, list)) else o)
    return outs


def _checked(score, what) -> float:
    if not isinstance(score, (int, float)) or math.isnan(float(score)) or math.isinf(float(score)):
        raise ValueError(f"eval_fn returned {score!r} for {what}; it must return a finite float (higher is better)")
    return float(score)


def amp(sim, candidates, eval_fn, allowed_drop: float | None, data=None, *, num_proxy_batches: int = 4,
        baseline=None, search: str = "binary", results_dir: str | None = None, clean_start: bool = False,
        fp32_score: float | None = None, show_progress: bool = True) -> AMPResult:
    """Choose per-group precisions for ``sim`` (modified in place, left calibrated).

    candidates: at least two of ((act_bw, dtype), (param_bw, dtype)) or names ("W8A8",
    "W8A16", "W16A16", "FP16"). eval_fn(model) -> float, higher is better. allowed_drop:
    absolute drop from the FP32 score (None: build the whole curve by brute force).
    data: calibration batches (used once if the sim has no statistics yet) and the first
    ``num_proxy_batches`` for the phase-1 proxy (SQNR of the model output vs FP32).
    Phase results are saved in results_dir and reused by a rerun on the same model, data
    and candidates (``clean_start=True`` ignores them).
    """
    t_start = time.perf_counter()
    cands = [parse_candidate(c) for c in candidates]
    if len(set(cands)) < 2:
        raise ValueError(f"AMP needs at least two distinct candidates (got {[c.name for c in cands]})")
    kernels = sim.hw.supported_kernels()
    if kernels:
        ok = {Candidate(k["activation"]["bitwidth"], k["activation"].get("dtype", "int"),
                        k["param"]["bitwidth"], k["param"].get("dtype", "int")) for k in kernels}
        dropped = [c.name for c in cands if c not in ok]
        cands = [c for c in cands if c in ok]
        if len(cands) < 2:
            raise ValueError(f"the hardware config's supported_kernels allow fewer than two of the candidates "
                             f"(not supported: {dropped}); pick candidates from {[c.name for c in ok]}")
    if search not in ("binary", "brute_force"):
        raise ValueError("search must be 'binary' or 'brute_force'")
    if allowed_drop is None:
        search = "brute_force"
    if not hasattr(sim, "dummy_input"):
        raise ValueError("this sim has no dummy_input recorded; build it with rapidquant.QuantSim")
    groups = find_groups(sim, sim.dummy_input)
    if not any(g.macs for g in groups):
        raise ValueError("no quantizer group contains a Conv/Linear layer: BitOps are zero for every candidate")

    def cost(c):
        return bitops(groups, {g.name: c for g in groups})

    cands.sort(key=cost)
    base = parse_candidate(baseline) if baseline is not None else cands[-1]
    if base not in cands:
        raise ValueError(f"baseline {base.name} is not among the candidates {[c.name for c in cands]}")
    low = cands[0]
    res = AMPResult([], None, base.name, float("nan"), None, False, "")
    # statistics once; every candidate's encodings derive from them
    if any(q.enabled and q.stats is None and not q.frozen for q in sim.quantizers().values()):
        if data is None:
            raise ValueError("the sim is not calibrated and no data was given")
        sim.compute_encodings(data, show_progress=show_progress)
        res.calibration_passes = 1
    proxy = []
    if data is not None:
        for b in data:
            if len(proxy) >= num_proxy_batches:
                break
            proxy.append(b)
    if not proxy:
        raise ValueError("AMP needs data for its phase-1 proxy (a few batches)")
    snap = snapshot(sim)

    def set_all(c):
        for g in groups:
            apply_candidate(sim, g, c, snap)

    cache = _Cache(results_dir, clean_start, {
        "model": model_hash(sim.model), "data": data_hash(proxy),
        "groups": [asdict(g) for g in groups], "candidates": [c.name for c in cands], "baseline": base.name})

    def user_eval(key, what):
        if key in cache.scores:
            return cache.scores[key]
        s = _checked(eval_fn(sim.model), what)
        res.evaluations += 1
        cache.scores[key] = s
        cache.save()
        return s

    with sim.disabled():
        res.fp32_score = fp32_score if fp32_score is not None else user_eval("fp32", "the FP32 model")
        ref_outs = _outputs(sim.model, proxy, sim._n_inputs)
    res.target = None if allowed_drop is None else res.fp32_score - allowed_drop
    set_all(base)
    base_score = user_eval(f"all:{base.name}", f"all groups at {base.name}")
    set_all(low)
    low_score = user_eval(f"all:{low.name}", f"all groups at {low.name}")
    base_bits = cost(base)
    base_pt = ParetoPoint(1.0, base_score, {g.name: base.name for g in groups}, 0)
    low_pt = ParetoPoint(cost(low) / base_bits, low_score, {g.name: low.name for g in groups}, -1)
    if res.target is not None and base_score < res.target:
        set_all(base)
        res.pareto_front, res.chosen = [base_pt], base_pt
        res.message = (f"even {base.name} everywhere scores {base_score:.4f} < target {res.target:.4f}: "
                       "mixed precision cannot meet the allowed drop; left at the baseline")
        return _finish(res, cache, t_start)
    if res.target is not None and low_score >= res.target:
        res.pareto_front, res.chosen, res.met = [low_pt, base_pt], low_pt, True
        res.message = f"the cheapest candidate {low.name} already meets the target everywhere"
        return _finish(res, cache, t_start)

    # ---- phase 1: one group at a time at a lower candidate, everything else float
    t1 = time.perf_counter()
    items = [(g, c) for g in groups for c in cands if c != base and cost(c) < base_bits]
    entries = []
    todo = [(i, g, c) for i, (g, c) in enumerate(items) if f"{g.name}|{c.name}" not in cache.phase1]
    error = None
    try:  # under torch.distributed each rank scores its share of the items
        for i, g, c in progress([t for t in todo if D.mine(t[0])], desc="AMP phase 1",
                                enabled=show_progress and D.is_main()):
            set_all(None)
            apply_candidate(sim, g, c, snap)
            outs = _outputs(sim.model, proxy, sim._n_inputs)
            cache.phase1[f"{g.name}|{c.name}"] = sum(sqnr_db(o, r) for o, r in zip(outs, ref_outs)) / len(outs)
            res.proxy_evaluations += 1
            cache.save()
    except Exception as e:  # noqa: BLE001 - re-raised after telling the other ranks
        error = e
    D.check_failures(error, "AMP phase 1")
    for part in D.gather_objects(cache.phase1):
        cache.phase1.update(part)
    cache.save()
    for g, c in items:
        entries.append((g, c, cache.phase1[f"{g.name}|{c.name}"]))
    res.phase1 = [(g.name, c.name, s) for g, c, s in entries]
    res.phase1_seconds = time.perf_counter() - t1
    # most harmless changes first; ties: more bits kept, then larger saving
    order = {g.name: i for i, g in enumerate(groups)}
    entries.sort(key=lambda e: (-e[2], -(e[1].act_bw + e[1].param_bw), cost(e[1]), order[e[0].name]))

    # ---- phase 2: cumulative prefixes of the sorted list on top of the baseline
    t2 = time.perf_counter()

    def config_at(i):
        cfg = {g.name: base for g in groups}
        for g, c, _ in entries[:i]:
            if cost_of_group(g, c) < cost_of_group(g, cfg[g.name]):
                cfg[g.name] = c
        return cfg

    def cost_of_group(g, c):
        return bitops([g], {g.name: c})

    def point(i):
        cfg = config_at(i)
        key = "p2:" + obj_hash({k: v.name for k, v in cfg.items()})
        for g in groups:
            apply_candidate(sim, g, cfg[g.name], snap)
        s = user_eval(key, f"Pareto point {i}")
        return ParetoPoint(bitops(groups, cfg) / base_bits, s, {k: v.name for k, v in cfg.items()}, i)

    n = len(entries)
    pts = {}
    if search == "brute_force":
        for i in progress(range(1, n + 1), total=n, desc="AMP phase 2", enabled=show_progress):
            pts[i] = point(i)
        ok = [p for p in pts.values() if res.target is None or p.score >= res.target]
        best = min(ok, key=lambda p: p.rel_bitops) if ok and res.target is not None else None
    else:  # largest prefix whose score holds, assuming scores fall as the prefix grows
        lo, hi, best = 1, n, None
        while lo <= hi:
            mid = (lo + hi) // 2
            pts[mid] = point(mid)
            if pts[mid].score >= res.target:
                best, lo = pts[mid], mid + 1
            else:
                hi = mid - 1
    res.phase2_seconds = time.perf_counter() - t2
    res.pareto_front = sorted([base_pt, low_pt] + list(pts.values()), key=lambda p: p.rel_bitops)
    if res.target is None:
        chosen = base_pt
        res.message = "no allowed drop given: built the whole curve; the sim is left at the baseline"
    elif best is None:
        chosen = base_pt
        res.message = "no mixed configuration met the target; left at the baseline"
    else:
        chosen = best
        res.met = True
        res.message = f"chose {best.rel_bitops:.3f}x baseline BitOps at score {best.score:.4f}"
    for g in groups:
        apply_candidate(sim, g, parse_candidate(chosen.config[g.name]), snap)
    res.chosen = chosen
    return _finish(res, cache, t_start)


def _finish(res: AMPResult, cache: "_Cache", t0) -> AMPResult:
    if cache.dir and D.is_main():
        res.plot_path = _plot(res, cache.dir)
        with open(os.path.join(cache.dir, "amp_result.json"), "w") as f:
            json.dump({k: v for k, v in asdict(res).items()}, f, indent=1, default=str)
    return res


class _Cache:
    """Phase results on disk (results_dir/amp_cache.json), keyed by model/data/config."""

    def __init__(self, directory, clean, key_obj):
        self.dir = directory
        self.key = obj_hash(key_obj)
        self.phase1, self.scores = {}, {}
        if directory:
            os.makedirs(directory, exist_ok=True)
            self.path = os.path.join(directory, "amp_cache.json")
            if not clean and os.path.exists(self.path):
                with open(self.path) as f:
                    d = json.load(f)
                if d.get("key") == self.key:
                    self.phase1, self.scores = d.get("phase1", {}), d.get("scores", {})

    def save(self):
        if not self.dir or not D.is_main():
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"key": self.key, "phase1": self.phase1, "scores": self.scores}, f)
        os.replace(tmp, self.path)


def _plot(res: AMPResult, directory: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p.rel_bitops for p in res.pareto_front]
    ys = [p.score for p in res.pareto_front]
    ax.plot(xs, ys, "o-", label="evaluated points")
    if res.chosen is not None:
        ax.plot([res.chosen.rel_bitops], [res.chosen.score], "r*", markersize=14, label="chosen")
    ax.axhline(res.fp32_score, color="gray", ls="--", label="FP32")
    if res.target is not None:
        ax.axhline(res.target, color="red", ls=":", label="target")
    ax.set_xlabel("relative BitOps (baseline = 1)")
    ax.set_ylabel("score")
    ax.set_title("AMP Pareto front")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(directory, "amp_pareto.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

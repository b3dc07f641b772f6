"""Automatic mixed precision: phase 1 scores every quantizer group at every candidate with
a cheap proxy, phase 2 searches the Pareto front of relative BitOps vs the user's score."""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

from rapidquant import distributed as D
from rapidquant.fingerprint import data_hash, hash_tensors, model_hash, obj_hash
from rapidquant.mixed_precision.groups import (
    Candidate, apply_candidate, bitops, find_groups, parse_candidate, restore, settle, snapshot, weight_swaps,
)
from rapidquant.progress import progress
from rapidquant.scoring import as_score, model_outputs, output_sqnr, sqnr_db  # noqa: F401 (sqnr_db re-exported)


@dataclass
class ParetoPoint:
    rel_bitops: float
    score: float
    config: dict           # group name -> candidate name
    prefix: int = -1       # how many phase-1 entries were applied on top of the baseline
    latency_ms: float | None = None  # its exported file in onnxruntime (cost="latency" only)


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
    evaluated: list = field(default_factory=list)   # every evaluated point; pareto_front keeps the undominated
    cost: str = "bitops"                            # what "cheaper" meant: "bitops" or "latency"
    float_latency_ms: float | None = None           # the float model exported the same way (cost="latency")
    latency_threads: int | None = None


def pareto_filter(points: list, cost=lambda p: p.rel_bitops) -> list:
    """The points no other point beats on both cost and score (cheapest first)."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (cost(p), -p.score)):
        if p.score > best:
            front.append(p)
            best = p.score
    return front


def _start_key(snap: dict) -> str:
    """What of the starting sim changes AMP's results: which quantizers are enabled, and the
    frozen encodings (e.g. AdaRound's) it keeps at their own precision. Other encodings
    are re-derived from the statistics, so a rerun on a sim that an earlier AMP run left
    at its chosen mix hits the same cache."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(snap):
        st = snap[name]
        h.update(f"{name}|{st.enabled}|{st.frozen}".encode())
        if st.frozen:
            h.update(repr(st.precision()).encode())
            hash_tensors([st.scale, st.zero_point], h)
    return h.hexdigest()[:16]


def amp(sim, candidates, eval_fn, allowed_drop: float | None, data=None, *, num_proxy_batches: int = 4,
        baseline=None, search: str = "binary", results_dir: str | None = None, clean_start: bool = False,
        fp32_score: float | None = None, show_progress: bool = True,
        eval_fingerprint: str | None = None, float_weights: dict | None = None, cost: str = "bitops",
        latency_threads: int = 1) -> AMPResult:
    """Choose per-group precisions for ``sim`` (modified in place, left calibrated).

    candidates: at least two of ((act_bw, dtype), (param_bw, dtype)) or names ("W8A8",
    "W8A16", "W16A16", "FP16"). eval_fn(model) -> float, higher is better. allowed_drop:
    absolute drop from the FP32 score (None: build the whole curve by brute force).
    data: calibration batches (used once if the sim has no statistics yet) and the first
    ``num_proxy_batches`` for the phase-1 proxy (SQNR of the model output vs FP32).
    Phase results are saved in results_dir and reused by a rerun on the same model, data
    and candidates (``clean_start=True`` ignores them).
    The cache key covers the weights, the proxy data, the sim configuration, the enabled
    quantizers and frozen encodings at the start, the candidates and
    ``eval_fingerprint`` (any string that changes when your eval_fn does).
    float_weights: {parameter quantizer name: weights before rounding} for frozen encodings
    whose rounding was written into the weights (AdaRound's AdaRoundResult.float_weights):
    at any other precision those layers use the float weights, not re-rounded ones.
    If the search raises, the sim is restored to the state it started in.
    The binary search assumes scores fall as more groups move to lower precision
    (cumulative prefixes of the phase-1 order); ``search="brute_force"`` evaluates every prefix.
    cost: "bitops" picks the point with the fewest BitOps that meets the target; "latency"
    exports every evaluated point (and the float model) and picks the one onnxruntime runs
    fastest on this machine (CPU, ``latency_threads`` threads, median of interleaved rounds on
    the dummy input): an int8 layer that runs slower than float is not worth its drop. The
    search itself still orders groups by the proxy and BitOps.
    """
    if cost not in ("bitops", "latency"):
        raise ValueError(f"cost={cost!r}: 'bitops' or 'latency'")
    if not isinstance(latency_threads, int) or latency_threads < 1:
        raise ValueError(f"latency_threads={latency_threads!r}: a thread count >= 1")
    start = snapshot(sim)
    swaps = weight_swaps(sim, float_weights, start)
    try:
        return _search(sim, candidates, eval_fn, allowed_drop, data, num_proxy_batches, baseline, search,
                       results_dir, clean_start, fp32_score, show_progress, eval_fingerprint, start, swaps,
                       cost, latency_threads)
    except BaseException:
        restore(sim, start)
        settle(sim, swaps, start)
        raise


def _search(sim, candidates, eval_fn, allowed_drop, data, num_proxy_batches, baseline, search, results_dir,
            clean_start, fp32_score, show_progress, eval_fingerprint, start, swaps, cost_kind="bitops",
            latency_threads=1) -> AMPResult:
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
        settle(sim, swaps, snap)

    def set_config(names: dict):
        for g in groups:
            apply_candidate(sim, g, parse_candidate(names[g.name]), snap)
        settle(sim, swaps, snap)

    def done():
        if cost_kind == "latency":
            _choose_by_latency(sim, res, set_config, results_dir, latency_threads)
        return _finish(res, cache, t_start)

    cache = _Cache(results_dir, clean_start, {
        "model": model_hash(sim.model), "data": data_hash(proxy),
        "groups": [asdict(g) for g in groups], "candidates": [c.name for c in cands], "baseline": base.name,
        "sim_config": asdict(sim.config), "start": _start_key(start), "eval": eval_fingerprint,
        "float_weights": hash_tensors([x for n in sorted(swaps) for x in (n, swaps[n][2])]).hexdigest()[:16]})

    def user_eval(key, what):
        if key in cache.scores:
            return cache.scores[key]
        s = as_score(eval_fn(sim.model), what)
        res.evaluations += 1
        cache.scores[key] = s
        cache.save()
        return s

    with sim.disabled():
        settle(sim, swaps, snap)  # FP32 is the model before any rounding
        res.fp32_score = fp32_score if fp32_score is not None else user_eval("fp32", "the FP32 model")
        ref_outs = model_outputs(sim.model, proxy, sim.n_inputs)
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
        res.pareto_front, res.chosen, res.evaluated = [base_pt], base_pt, [low_pt, base_pt]
        res.message = (f"even {base.name} everywhere scores {base_score:.4f} < target {res.target:.4f}: "
                       "mixed precision cannot meet the allowed drop; left at the baseline")
        return done()
    if res.target is not None and low_score >= res.target:
        res.evaluated = [low_pt, base_pt]
        res.pareto_front, res.chosen, res.met = pareto_filter(res.evaluated), low_pt, True
        res.message = f"the cheapest candidate {low.name} already meets the target everywhere"
        return done()

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
            settle(sim, swaps, snap)
            cache.phase1[f"{g.name}|{c.name}"] = output_sqnr(sim.model, proxy, ref_outs, sim.n_inputs)
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
        settle(sim, swaps, snap)
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
    res.evaluated = sorted([base_pt, low_pt] + list(pts.values()), key=lambda p: p.rel_bitops)
    res.pareto_front = pareto_filter(res.evaluated)
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
    settle(sim, swaps, snap)
    res.chosen = chosen
    return done()


# points this much slower than the fastest count as equally fast: medians of interleaved rounds
# of points at the same precision spread +-4% here (digits MobileNet, 5.8-6.3 ms, one thread)
LATENCY_TIE = 0.05


def _choose_by_latency(sim, res: AMPResult, set_config, results_dir: str | None, threads: int) -> None:
    """Export every evaluated point and the float model, time them in onnxruntime (rank 0;
    the others take its figures), and move the choice to the fastest point that meets the
    target (of those within LATENCY_TIE of it, the one with the fewest BitOps); the sim is
    left at it."""
    points = list({obj_hash(p.config): p for p in res.evaluated}.values())
    ms, error = None, None
    if D.is_main():
        try:
            if results_dir:
                ms = _time_points(sim, points, set_config, os.path.join(results_dir, "latency"), threads)
            else:
                with tempfile.TemporaryDirectory(prefix="rapidquant-amp-") as folder:
                    ms = _time_points(sim, points, set_config, folder, threads)
        except Exception as e:  # noqa: BLE001 - re-raised after telling the other ranks
            error = e
    D.check_failures(error, "AMP latency")
    if D.active():
        ms = D.gather_objects(ms)[0]
    for i, p in enumerate(points):
        p.latency_ms = ms[i]
    for p in res.evaluated:  # a repeated configuration has the same file
        p.latency_ms = next(q.latency_ms for q in points if q.config == p.config)
    res.cost, res.float_latency_ms, res.latency_threads = "latency", ms["float"], threads
    res.pareto_front = pareto_filter(res.evaluated, cost=lambda p: p.latency_ms)
    ok = [p for p in res.evaluated if res.target is not None and p.score >= res.target]
    if ok:  # within timing noise of the fastest, the fewest BitOps (a target with integer kernels gains most)
        fastest = min(p.latency_ms for p in ok)
        res.chosen = min((p for p in ok if p.latency_ms <= fastest * (1 + LATENCY_TIE)), key=lambda p: p.rel_bitops)
        res.met = True
        res.message = (f"chose the fastest point that meets the target: {res.chosen.latency_ms:.3f} ms in "
                       f"onnxruntime ({threads} thread(s); float {res.float_latency_ms:.3f} ms), "
                       f"{res.chosen.rel_bitops:.3f}x baseline BitOps, score {res.chosen.score:.4f}")
    if res.chosen is not None:
        if res.chosen.latency_ms > res.float_latency_ms:
            res.message += (f"; the float model runs faster on this machine ({res.float_latency_ms:.3f} vs "
                            f"{res.chosen.latency_ms:.3f} ms): quantization does not pay here in onnxruntime")
        set_config(res.chosen.config)


def _time_points(sim, points, set_config, folder: str, threads: int) -> dict:
    """{index: ms, "float": ms}: each point's exported file and the float model in onnxruntime."""
    from rapidquant.export.latency import against_float
    files = {}
    for i, p in enumerate(points):
        set_config(p.config)
        files[i] = sim.export(folder, sim.dummy_input, f"point_{i}", overwrite=True).onnx
    return against_float(sim, sim.dummy_input, files, folder, threads=threads, repeats=20)


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
    from rapidquant.report.plots import pyplot
    plt = pyplot()  # matplotlib is a dependency: plotted the same way as AutoQuant's report
    fig, ax = plt.subplots(figsize=(6, 4))
    x = (lambda p: p.latency_ms) if res.cost == "latency" else (lambda p: p.rel_bitops)
    ax.plot([x(p) for p in res.evaluated], [p.score for p in res.evaluated], "o", color="#9ab",
            label="evaluated points")
    ax.plot([x(p) for p in res.pareto_front], [p.score for p in res.pareto_front], "o-", label="Pareto front")
    if res.chosen is not None:
        ax.plot([x(res.chosen)], [res.chosen.score], "r*", markersize=14, label="chosen")
    if res.float_latency_ms is not None:
        ax.axvline(res.float_latency_ms, color="gray", ls="-.", label="float model's latency")
    ax.axhline(res.fp32_score, color="gray", ls="--", label="FP32")
    if res.target is not None:
        ax.axhline(res.target, color="red", ls=":", label="target")
    ax.set_xlabel(f"median latency in onnxruntime (ms, {res.latency_threads} thread(s))" if res.cost == "latency"
                  else "relative BitOps (baseline = 1)")
    ax.set_ylabel("score")
    ax.set_title("AMP Pareto front" + (": latency and accuracy" if res.cost == "latency" else ""))
    ax.legend()
    fig.tight_layout()
    path = os.path.join(directory, "amp_pareto.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

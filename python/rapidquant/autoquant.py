"""AutoQuant: apply post-training techniques in sequence until the allowed drop is met.

prepare -> FP32 score -> quantization-scheme selection -> W32 check (on the BN-folded and
equalized model) -> BN folding -> CLE -> AdaRound -> AMP (optional), stopping as soon as
the best score so far meets the target. Every stage is recorded (status, score, time,
artifacts) and cached under results_dir, keyed by the model weights, the data and the
config, so a rerun resumes where the last one stopped.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from rapidquant import distributed as D
from rapidquant.config import QuantSimConfig
from rapidquant.fingerprint import data_hash, model_hash, obj_hash
from rapidquant.mixed_precision.amp import _checked
from rapidquant.progress import progress
from rapidquant.quantsim import QuantSim
from rapidquant.techniques import AdaRoundConfig, CLEConfig, adaround, equalize, fold_batch_norms

STAGES = ("prepare", "fp32", "scheme_selection", "w32_check", "bn_fold", "cle", "adaround", "amp", "export")
DEFAULT_SCHEMES = (("minmax", "minmax"), ("mse", "sqnr"), ("mse", "percentile"), ("mse", "mse"))


@dataclass(frozen=True)
class AutoQuantConfig:
    """AutoQuant settings. allowed_drop is absolute (same units as eval_fn)."""
    param_bw: int = 8
    act_bw: int = 8
    per_channel: bool | None = None
    allowed_drop: float = 0.01
    hw_config: str | dict = "default_per_channel"
    scheme_candidates: tuple = DEFAULT_SCHEMES   # (param_scheme, act_scheme) pairs
    schemes_fully_evaluated: int = 2             # the best this many by proxy get eval_fn
    num_calibration_batches: int | None = 16
    num_proxy_batches: int = 4
    use_adaround: bool = True
    adaround: AdaRoundConfig | None = None       # None: defaults at param_bw
    amp_candidates: tuple | None = None          # e.g. ("W8A8", "W8A16", "W16A16")
    results_dir: str = "rapidquant-results"
    time_budget_s: float | None = None
    seed: int = 0
    strict: bool = False
    export: bool = True
    percentile: float = 99.99

    def __post_init__(self):
        if not self.scheme_candidates:
            raise ValueError("scheme_candidates must not be empty")
        if self.schemes_fully_evaluated < 1:
            raise ValueError("schemes_fully_evaluated must be >= 1")
        if self.time_budget_s is not None and self.time_budget_s < 0:
            raise ValueError("time_budget_s must be >= 0")


@dataclass
class StageRecord:
    name: str
    status: str = "pending"        # ok | met | failed | skipped | cached
    score: float | None = None
    seconds: float = 0.0
    message: str = ""
    artifacts: dict = field(default_factory=dict)


@dataclass
class AutoQuantResult:
    model: nn.Module | None
    sim: QuantSim | None
    score: float | None
    fp32_score: float | None
    target: float | None
    met: bool
    message: str
    stages: list
    best_stage: str | None = None
    onnx_path: str | None = None
    encodings_path: str | None = None
    report_path: str | None = None
    seconds: float = 0.0
    export_check: dict = field(default_factory=dict)


class AutoQuant:
    """``aq = AutoQuant(model, dummy_input, data, eval_fn, config); result = aq.optimize()``.

    data: calibration batches (a DataLoader or a list; tuples pass their first elements to
    the model); eval_fn(model, num_samples=None) -> float, higher is better.
    """

    def __init__(self, model: nn.Module, dummy_input, data, eval_fn, config: AutoQuantConfig = AutoQuantConfig(),
                 show_progress: bool = True, log=None):
        self.model = model
        self.dummy_input = dummy_input
        self.eval_fn = eval_fn
        self.config = config
        self.show_progress = show_progress
        self._log_fn = log
        self.batches = []
        for b in data:
            if config.num_calibration_batches is not None and len(self.batches) >= config.num_calibration_batches:
                break
            self.batches.append(b)
        if not self.batches:
            raise ValueError("AutoQuant got no calibration batches: the data loader is empty")
        self.evaluations = 0

    # ------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        if not D.is_main():
            return
        if self._log_fn is not None:
            self._log_fn(msg)
        elif self.show_progress:
            print(f"[rapidquant] {msg}", file=sys.stderr, flush=True)

    def _eval(self, model, what: str) -> float:
        try:
            s = self.eval_fn(model)
        except TypeError:
            s = self.eval_fn(model, None)
        self.evaluations += 1
        return _checked(s, what)

    def _sim_cfg(self, schemes=None, **kw) -> QuantSimConfig:
        c = self.config
        ps, as_ = schemes or self.schemes
        return QuantSimConfig(param_bw=c.param_bw, act_bw=c.act_bw, per_channel=c.per_channel, hw_config=c.hw_config,
                              param_scheme=ps, act_scheme=as_, percentile=c.percentile, **kw)

    def _calibrated_sim(self, model, schemes=None, adaround_result=None, shard=None) -> QuantSim:
        sim = QuantSim(model, self.dummy_input, self._sim_cfg(schemes))
        if adaround_result is not None:
            adaround_result.apply_to(sim)
        local = shard is False  # a rank's own piece of split work: no collectives
        sim.compute_encodings(self.batches, show_progress=self.show_progress and D.is_main(),
                              shard=None if not local else False, sync=None if not local else False)
        return sim

    def _proxy(self, sim, ref_outs) -> float:
        from rapidquant.mixed_precision.amp import _outputs, sqnr_db
        outs = _outputs(sim.model, self.batches[: self.config.num_proxy_batches], sim._n_inputs)
        return sum(sqnr_db(o, r) for o, r in zip(outs, ref_outs)) / len(outs)

    # ------------------------------------------------------------------ cache
    def _cache_dir(self) -> str:
        c = self.config
        cfg = {k: v for k, v in asdict(c).items() if k not in ("results_dir", "time_budget_s", "strict", "export")}
        key = obj_hash({"model": model_hash(self.model), "data": data_hash(self.batches), "config": cfg})
        return os.path.join(c.results_dir, "cache", key)

    def _load_stage(self, name):
        if hasattr(self, "_snapshot"):
            return self._snapshot.get(name)
        path = os.path.join(self.cache, f"{name}.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            d = json.load(f)
        return StageRecord(**d)

    def _save_stage(self, rec: StageRecord, model: nn.Module | None = None, sim: QuantSim | None = None,
                    extra=None) -> None:
        if not D.is_main():
            return  # one set of artifacts, written by rank 0
        os.makedirs(self.cache, exist_ok=True)
        if model is not None:  # the whole module: later stages may have changed its structure
            p = os.path.join(self.cache, f"{rec.name}.model.pt")
            torch.save(model, p + ".tmp")
            os.replace(p + ".tmp", p)
        if sim is not None:
            sim.save_encodings(os.path.join(self.cache, f"{rec.name}.encodings.json"), overwrite=True)
        if extra is not None:
            with open(os.path.join(self.cache, f"{rec.name}.extra.json"), "w") as f:
                json.dump(extra, f)
        tmp = os.path.join(self.cache, f"{rec.name}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(rec), f, indent=1, default=str)
        os.replace(tmp, os.path.join(self.cache, f"{rec.name}.json"))

    def _cached_model(self, name) -> nn.Module:
        return torch.load(os.path.join(self.cache, f"{name}.model.pt"), weights_only=False).eval()

    def _cached_sim(self, name, model) -> QuantSim:
        sim = QuantSim(model, self.dummy_input, self._sim_cfg())
        sim.load_encodings(os.path.join(self.cache, f"{name}.encodings.json"), freeze=False, strict=False)
        if name == "adaround":
            for q in sim.param_quantizers().values():
                q.frozen = True
        return sim

    # ------------------------------------------------------------------ public
    def run_inference(self):
        """A plain quantized baseline: (sim, score) with the first scheme candidate."""
        sim = self._calibrated_sim(copy.deepcopy(self.model).eval(), self.config.scheme_candidates[0])
        return sim, self._eval(sim.model, "the quantized baseline")

    def optimize(self) -> AutoQuantResult:
        c = self.config
        t_start = time.perf_counter()
        torch.manual_seed(c.seed)
        os.makedirs(c.results_dir, exist_ok=True)
        self.cache = self._cache_dir()
        D.barrier()  # every rank sees the same cache: decided once, before any stage runs
        if hasattr(self, "_snapshot"):
            del self._snapshot
        self._snapshot = {n: r for n in STAGES if (r := self._load_stage(n)) is not None}
        stages: dict[str, StageRecord] = {}
        best = {"score": None, "sim": None, "model": None, "stage": None}
        res = AutoQuantResult(None, None, None, None, None, False, "", [])
        self.schemes = c.scheme_candidates[0]
        was = self.model.training
        self.model.eval()

        def over_budget():
            return c.time_budget_s is not None and time.perf_counter() - t_start > c.time_budget_s

        def consider(name, score, sim, model):
            if score is not None and (best["score"] is None or score > best["score"]):
                best.update(score=score, sim=sim, model=model, stage=name)

        def met():
            return best["score"] is not None and res.target is not None and best["score"] >= res.target

        def run(name, fn):
            """Run one stage (or load it from the cache). fn() -> (StageRecord fields, model, sim, extra)."""
            rec = StageRecord(name)
            stages[name] = rec
            if over_budget() and name not in ("prepare", "fp32"):  # those two are always needed
                rec.status, rec.message = "skipped", f"time budget of {c.time_budget_s} s spent"
                self.log(f"{name}: skipped ({rec.message})")
                return None
            cached = self._load_stage(name)
            if cached is not None and cached.status in ("ok", "met"):
                out = self._restore(name, cached)
                stages[name] = cached
                cached.message = (cached.message + " (from cache)").strip()
                self.log(f"{name}: {_fmt(cached.score)} (cached)")
                return out
            t0 = time.perf_counter()
            try:
                score, model, sim, extra, msg = fn()
            except Exception as e:  # noqa: BLE001 - a stage failing is an outcome
                rec.status, rec.seconds = "failed", time.perf_counter() - t0
                rec.message = f"{type(e).__name__}: {e}"
                self.log(f"{name}: FAILED in {rec.seconds:.1f} s: {rec.message}")
                if c.strict or isinstance(e, (KeyboardInterrupt,)):
                    raise
                return None
            rec.score, rec.seconds, rec.message = score, time.perf_counter() - t0, msg
            rec.status = "ok"
            self._save_stage(rec, model, sim, extra)
            self.log(f"{name}: {_fmt(score)} in {rec.seconds:.1f} s {msg}")
            return score, model, sim, extra

        try:
            # ---- prepare: trace and validate once
            def prepare():
                QuantSim(self.model, self.dummy_input, self._sim_cfg())
                return None, None, None, None, "model traced; all modules supported"
            run("prepare", prepare)
            if stages["prepare"].status == "failed":
                raise RuntimeError("AutoQuant cannot prepare the model: " + stages["prepare"].message)

            # ---- FP32
            out = run("fp32", lambda: (self._eval(self.model, "the FP32 model"), None, None, None, ""))
            if out is None:
                raise RuntimeError("the FP32 evaluation failed: " + stages["fp32"].message)
            res.fp32_score = out[0]
            res.target = res.fp32_score - c.allowed_drop
            self.log(f"target: {_fmt(res.target)} (FP32 {_fmt(res.fp32_score)} - allowed drop {c.allowed_drop})")

            # ---- scheme selection: proxy for all, eval_fn for the best few
            def schemes():
                from rapidquant.mixed_precision.amp import _outputs
                ref = _outputs(self.model, self.batches[: c.num_proxy_batches], _n_inputs(self.dummy_input))
                mine = {}
                for i, sch in enumerate(progress(c.scheme_candidates, desc="scheme selection",
                                                 enabled=self.show_progress and D.is_main())):
                    if D.mine(i):  # under torch.distributed, each rank calibrates its share
                        sim = self._calibrated_sim(copy.deepcopy(self.model), sch, shard=False)
                        mine[i] = (self._proxy(sim, ref), sim)
                proxies = {}
                for part in D.gather_objects({i: p for i, (p, _) in mine.items()}):
                    proxies.update(part)
                order = sorted(proxies, key=lambda i: -proxies[i])
                top = order[: c.schemes_fully_evaluated]
                scores = {}
                for j, i in enumerate(top):
                    if D.mine(j):
                        if i not in mine:
                            sim = self._calibrated_sim(copy.deepcopy(self.model), c.scheme_candidates[i], shard=False)
                            mine[i] = (proxies[i], sim)
                        scores[i] = self._eval(mine[i][1].model, f"scheme {c.scheme_candidates[i]}")
                for part in D.gather_objects(scores):
                    scores.update(part)
                best_i = max(top, key=lambda i: scores[i])
                sch = tuple(c.scheme_candidates[best_i])
                sim = mine[best_i][1] if best_i in mine else \
                    self._calibrated_sim(copy.deepcopy(self.model), sch, shard=False)
                score = scores[best_i]
                scored = [(proxies[i], c.scheme_candidates[i], None) for i in order]
                full = [(scores[i], proxies[i], c.scheme_candidates[i], None) for i in top]
                self.schemes = tuple(sch)
                table = [{"scheme": list(s), "proxy_sqnr_db": p} for p, s, _ in scored]
                for sc, p, s, _ in full:
                    next(t for t in table if t["scheme"] == list(s))["score"] = sc
                msg = (f"proxy (output SQNR) for {len(scored)} schemes, eval_fn for the best "
                       f"{len(full)}; chose param={sch[0]}, act={sch[1]}")
                return score, None, sim, {"schemes": table, "chosen": list(sch)}, msg
            out = run("scheme_selection", schemes)
            if over_budget():
                return self._finish(res, stages, best, t_start, f"time budget of {c.time_budget_s} s spent; "
                                    "returning the best result so far")
            if out is not None:
                extra = out[3] or self._extra("scheme_selection")
                self.schemes = tuple(extra["chosen"])
                stages["scheme_selection"].artifacts["schemes"] = extra["schemes"]
                foldable = len(fold_batch_norms(copy.deepcopy(self.model), self.dummy_input).folded)
                if foldable:
                    # Quantized with its BNs unfolded, the model is not what a target runs: NPU
                    # converters fold BNs into already-quantized weights, and a BN between a conv
                    # and its output quantizer keeps onnxruntime's conv in float. That score picks
                    # the scheme; results start at the BN-folded model (as in AIMET).
                    stages["scheme_selection"].message += (
                        f"; {foldable} foldable BNs, so this score (BNs unfolded) only picks the scheme")
                else:
                    consider("scheme_selection", out[0], out[2], self.model)
            if met():
                return self._finish(res, stages, best, t_start, "quantization with the best scheme meets the target")

            # ---- W32 check on the folded + equalized model (honest: CLE changes activation ranges)
            def w32():
                m = copy.deepcopy(self.model)
                fold_batch_norms(m, self.dummy_input)
                equalize(m, self.dummy_input, CLEConfig(fold_bn=False))
                sim = QuantSim(m, self.dummy_input, self._sim_cfg())
                for q in sim.param_quantizers().values():
                    q.enabled = False
                sim.compute_encodings(self.batches, show_progress=self.show_progress)
                return self._eval(sim.model, "activation-only quantization"), None, None, None, \
                    "weights float, activations quantized, on the BN-folded and equalized model"
            out = run("w32_check", w32)
            w32_failed = out is not None and res.target is not None and out[0] < res.target
            if w32_failed:
                stages["w32_check"].message += (f"; activation quantization alone scores {_fmt(out[0])} < target "
                                                f"{_fmt(res.target)}: no weight technique can recover that")
                if not c.amp_candidates:
                    for s in ("bn_fold", "cle", "adaround"):
                        stages[s] = StageRecord(s, "skipped", message="W32 check failed")
                    return self._finish(res, stages, best, t_start,
                                        "stopped early: activation quantization alone misses the target even after "
                                        "BN folding and CLE (try higher activation bitwidths, AMP candidates with "
                                        "16-bit activations, or a larger allowed drop)")
                # AMP can still raise activation bitwidths: BN folding and CLE (cheap) give it a
                # deployable model to start from; AdaRound cannot help and is skipped

            folded = {}

            def transformed(source, transform, what, info, detail):
                """Apply a graph transform to a copy of `source`, calibrate and evaluate it."""
                def stage():
                    m = copy.deepcopy(source)
                    r = transform(m, self.dummy_input)
                    sim = self._calibrated_sim(m)
                    return self._eval(sim.model, what), m, sim, info(r), detail(r)
                return stage

            # ---- BN folding, then CLE on the BN-folded model
            cle_in = self.model
            for name, transform, what, info, detail, done in (
                    ("bn_fold", fold_batch_norms, "BN-folded model",
                     lambda r: {"folded": r.folded, "not_folded": r.not_folded},
                     lambda r: f"folded {len(r.folded)} BNs", "BN folding meets the target"),
                    ("cle", equalize, "equalized model",
                     lambda r: {"scaled": r.scaled, "skipped": r.skipped},
                     lambda r: f"equalized {len(r.scaled)} layer pairs, high-bias folded {len(r.high_bias_folded)}",
                     "CLE meets the target")):
                out = run(name, transformed(cle_in, transform, what, info, detail))
                if out is not None:
                    consider(name, out[0], out[2], out[1])
                    folded[name] = (out[0], out[1])
                    if name == "bn_fold":
                        cle_in = out[1]
                if met():
                    return self._finish(res, stages, best, t_start, done)

            # ---- AdaRound on the better of the BN-folded and equalized models (deployed
            # models have their BNs folded, so the rounding is learned on folded weights)
            if w32_failed:
                stages["adaround"] = StageRecord("adaround", "skipped", message="W32 check failed")
            elif c.use_adaround:
                ada_in = max(folded.values(), key=lambda t: t[0])[1] if folded else self.model

                def ada():
                    cfg = c.adaround or AdaRoundConfig()
                    cfg = replace(cfg, param_bw=c.param_bw, per_channel=c.per_channel, hw_config=c.hw_config,
                                  param_scheme=self.schemes[0], seed=c.seed)
                    r = adaround(ada_in, self.dummy_input, self.batches, cfg, show_progress=self.show_progress)
                    sim = self._calibrated_sim(r.model, adaround_result=r)
                    layers = [asdict(l) for l in r.layers]
                    return self._eval(sim.model, "AdaRound model"), r.model, sim, {"layers": layers}, \
                        f"rounded {len(layers)} layers in {sum(l['iterations'] for l in layers)} iterations"
                out = run("adaround", ada)
                if out is not None:
                    consider("adaround", out[0], out[2], out[1])
                if met():
                    return self._finish(res, stages, best, t_start, "AdaRound meets the target")
            else:
                stages["adaround"] = StageRecord("adaround", "skipped", message="disabled in the config")
            return self._finish(res, stages, best, t_start, None, amp_allowed=True)
        finally:
            self.model.train(was)

    # ------------------------------------------------------------------ internals
    def _extra(self, name):
        p = os.path.join(self.cache, f"{name}.extra.json")
        if os.path.exists(p):
            with open(p) as f:
                return json.load(f)
        return None

    def _restore(self, name, rec):
        """Rebuild a cached stage's outputs without recomputing it."""
        extra = self._extra(name)
        model = sim = None
        if os.path.exists(os.path.join(self.cache, f"{name}.model.pt")):
            model = self._cached_model(name)
        if os.path.exists(os.path.join(self.cache, f"{name}.encodings.json")):
            if name == "scheme_selection":
                self.schemes = tuple(extra["chosen"])
            sim = self._cached_sim(name, model if model is not None else copy.deepcopy(self.model).eval())
        return rec.score, model, sim, extra

    def _finish(self, res, stages, best, t_start, message, amp_allowed=False):
        c = self.config
        if amp_allowed and c.amp_candidates and not (best["score"] is not None and best["score"] >= res.target):
            self._amp_stage(res, stages, best, t_start)
        res.met = best["score"] is not None and res.target is not None and best["score"] >= res.target
        if best["stage"] is not None and stages.get(best["stage"]):
            stages[best["stage"]].status = "met" if res.met else stages[best["stage"]].status
        res.score, res.sim, res.best_stage = best["score"], best["sim"], best["stage"]
        res.model = best["model"] if best["model"] is not None else self.model
        if message is None:
            message = ("target met" if res.met else
                       f"no stage met the target {_fmt(res.target)}; returning the best result "
                       f"({best['stage']}, {_fmt(best['score'])})")
        res.message = message
        for s in STAGES[2:8]:
            stages.setdefault(s, StageRecord(s, "skipped", message="not needed" if res.met else ""))
        if c.export and res.sim is not None and D.is_main():
            self._export(res, stages)
        res.stages = [stages[s] for s in STAGES if s in stages]
        res.seconds = time.perf_counter() - t_start
        if D.is_main():
            from rapidquant.report.autoquant_report import write_report
            res.report_path = write_report(res, self, os.path.join(c.results_dir, "report.html"))
        self.log(f"done in {res.seconds:.1f} s: {res.message}; report: {res.report_path}")
        return res

    def _amp_stage(self, res, stages, best, t_start):
        from rapidquant.mixed_precision import amp
        c = self.config
        rec = StageRecord("amp")
        stages["amp"] = rec
        if c.time_budget_s is not None and time.perf_counter() - t_start > c.time_budget_s:
            rec.status, rec.message = "skipped", f"time budget of {c.time_budget_s} s spent"
            return
        sim = best["sim"]
        if sim is None:
            rec.status, rec.message = "skipped", "no quantized model to start from"
            return
        t0 = time.perf_counter()
        try:
            r = amp(sim, c.amp_candidates, lambda m: self._eval(m, "AMP point"), c.allowed_drop, self.batches,
                    results_dir=os.path.join(c.results_dir, "amp"), fp32_score=res.fp32_score,
                    show_progress=self.show_progress)
        except Exception as e:  # noqa: BLE001
            rec.status, rec.seconds, rec.message = "failed", time.perf_counter() - t0, f"{type(e).__name__}: {e}"
            self.log(f"amp: FAILED: {rec.message}")
            if c.strict:
                raise
            return
        rec.seconds = time.perf_counter() - t0
        rec.status, rec.score, rec.message = "ok", r.chosen.score if r.chosen else None, r.message
        rec.artifacts = {"pareto_plot": r.plot_path, "pareto_front": [asdict(p) for p in r.pareto_front],
                         "chosen": asdict(r.chosen) if r.chosen else None}
        self.log(f"amp: {_fmt(rec.score)} in {rec.seconds:.1f} s {r.message}")
        if rec.score is not None and (best["score"] is None or rec.score >= best["score"] or r.met):
            best.update(score=rec.score, sim=sim, stage="amp")

    def _export(self, res, stages):
        c = self.config
        rec = StageRecord("export")
        t0 = time.perf_counter()
        try:
            out = res.sim.export(c.results_dir, self.dummy_input, "model", overwrite=True)
            res.onnx_path, res.encodings_path = out.onnx, out.encodings
            res.export_check = {"ort_ok": out.ort_ok, "ort_max_abs_diff": out.ort_max_abs_diff,
                                "qdq_pairs": out.qdq_pairs}
            rec.status = "ok"
            rec.message = f"ONNX runs in onnxruntime: {out.ort_ok}; max |sim - ort| = {out.ort_max_abs_diff}"
            rec.artifacts = {"onnx": out.onnx, "encodings": out.encodings}
        except Exception as e:  # noqa: BLE001
            rec.status, rec.message = "failed", f"{type(e).__name__}: {e}"
            if c.strict:
                raise
        rec.seconds = time.perf_counter() - t0
        stages["export"] = rec
        self.log(f"export: {rec.message}")


def _fmt(v):
    return "n/a" if v is None else f"{v:.4f}"


def _n_inputs(dummy):
    return len(dummy) if isinstance(dummy, (tuple, list)) else 1

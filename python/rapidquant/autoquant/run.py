"""The public entry: ``AutoQuant(model, dummy_input, data, eval_fn, config).optimize()``,
and the post-steps over the pipeline's state (final acceptance, export, report)."""
from __future__ import annotations

import os
import shutil
import sys
import time

import torch
from torch import nn

from rapidquant import distributed as D
from rapidquant.autoquant import stages as S
from rapidquant.autoquant.cache import StageCache, cache_key
from rapidquant.autoquant.config import AutoQuantConfig
from rapidquant.autoquant.evaluation import Evaluator
from rapidquant.autoquant.pipeline import PIPELINE, STAGES, accept, prefer_checked, run_pipeline
from rapidquant.autoquant.state import AutoQuantResult, RunState, StageRecord
from rapidquant.autoquant.verify import deciding_upper, interval_text, verify
from rapidquant.memory import old_objects_frozen, start_peak_window, window_peak_rss_mb
from rapidquant.modelcopy import copy_model


class AutoQuant:
    """``aq = AutoQuant(model, dummy_input, data, eval_fn, config); result = aq.optimize()``.

    data: calibration batches (a DataLoader or a list; tuples pass their first elements to
    the model, dicts are keyword inputs). eval_fn(model) (or eval_fn(model,
    num_samples=None)), higher is better: one number, or a 1-d tensor of per-sample scores
    (their mean is the score; they give the drop a confidence interval). The model given
    to eval_fn may be the exported ONNX model running in onnxruntime (a torch-callable
    module). verify_fn: the same kind of function on held-out samples the search never
    sees; the final answer is verified once with it, and ``met`` needs it to confirm.
    """

    def __init__(self, model: nn.Module, dummy_input, data, eval_fn, config: AutoQuantConfig | None = None,
                 show_progress: bool = True, log=None, verify_fn=None):
        self.model = model
        self.dummy_input = dummy_input
        self.config = config or AutoQuantConfig()
        if not isinstance(self.config, AutoQuantConfig):
            raise TypeError(f"config must be a rapidquant.AutoQuantConfig, got {type(self.config).__name__}")
        self.evaluator = Evaluator(eval_fn)
        self.verifier = Evaluator(verify_fn) if verify_fn is not None else None
        self.show_progress = show_progress
        self._log_fn = log
        n = self.config.num_calibration_batches
        self.batches = []
        for b in data:
            if n is not None and len(self.batches) >= n:
                break
            self.batches.append(b)
        if not self.batches:
            raise ValueError("AutoQuant got no calibration batches: the data loader is empty")

    @property
    def evaluations(self) -> int:
        return self.evaluator.count

    def log(self, msg: str) -> None:
        if not D.is_main():
            return
        if self._log_fn is not None:
            self._log_fn(msg)
        elif self.show_progress:
            print(f"[rapidquant] {msg}", file=sys.stderr, flush=True)

    def _state(self) -> RunState:
        return RunState(self.model, self.dummy_input, self.batches, self.config, self.evaluator, self.log,
                        self.show_progress, verifier=self.verifier, schemes=tuple(self.config.scheme_candidates[0]))

    def run_inference(self):
        """A plain quantized baseline: (sim, score) with the first scheme candidate."""
        state = self._state()
        sim = S.calibrated_sim(state, copy_model(self.model).eval())
        return sim, self.evaluator(sim.model, "the quantized baseline")

    def optimize(self) -> AutoQuantResult:
        c = self.config
        torch.manual_seed(c.seed)
        os.makedirs(c.results_dir, exist_ok=True)
        state = self._state()
        flow = [(s.name, s.doc) for s in PIPELINE]
        state.cache = StageCache(c.results_dir, cache_key(self.model, self.batches, c, flow))
        D.barrier()  # every rank sees the same cache, decided before any stage runs
        was = self.model.training
        self.model.eval()
        try:
            with old_objects_frozen():
                run_pipeline(state)
                return finish(state)
        finally:
            self.model.train(was)


def finish(state: RunState) -> AutoQuantResult:
    """Accept the best candidate on its artifact (if no stage did), export, report."""
    c = state.config
    t0, ev0 = time.perf_counter(), state.evaluator.count  # the export record carries this step's cost
    window = start_peak_window()
    if state.best.sim is not None and state.best.artifact is None and (c.export or c.verify_artifact):
        accept(state, state.stages[state.best.stage], state.outputs[state.best.stage])
        prefer_checked(state)
    b = state.best
    res = AutoQuantResult(model=b.model if b.model is not None else state.model, sim=b.sim, score=b.score,
                          fp32_score=state.fp32_score, target=state.target, met=state.met, message="",
                          stages=[], best_stage=b.stage, config=c)
    rec = state.stages.get(b.stage)
    res.sim_score = rec.score if rec is not None else None
    res.artifact_score = rec.artifact_score if rec is not None else None
    res.artifact_check = _artifact_check_label(b.artifact)
    if rec is not None and res.met:
        rec.status = "met"
    res.verification = _verify(state, res)
    if res.verification:
        res.met = res.met and res.verification["met"]
    res.message = _message(state, res)
    state.stages["export"] = export_rec = _export(state, res)
    res.latency = _latency(state, res)
    export_rec.seconds, export_rec.evaluations = time.perf_counter() - t0, state.evaluator.count - ev0
    export_rec.peak_rss_mb = window_peak_rss_mb(window)
    res.stages = [state.stages[n] for n in STAGES if n in state.stages]
    res.evaluations, res.calibrations = state.evaluator.count, state.calibrations
    res.seconds = time.perf_counter() - state.started
    if D.is_main():
        from rapidquant.report.autoquant_report import write_report
        res.report_path = write_report(res, os.path.join(c.results_dir, "report.html"))
    state.log(f"done in {res.seconds:.1f} s: {res.message}; report: {res.report_path}")
    return res


def _verify(state: RunState, res: AutoQuantResult) -> dict:
    """Score the accepted file (or the sim, when the file could not be scored) once more:
    with the held-out function when given, else with eval_fn when a confidence is asked."""
    c = state.config
    if res.sim is None or (state.verifier is None and c.confidence is None):
        return {}
    info = state.best.artifact or {}
    model = res.sim.model
    if info.get("onnx") and info.get("score") is not None:
        from rapidquant.batches import call_model
        from rapidquant.export import OnnxRuntimeModule
        with torch.no_grad():
            like = call_model(res.sim.model.eval(), state.dummy_input, res.sim.n_inputs)
        model = OnnxRuntimeModule(info["onnx"], output_like=like)
    fn = state.verifier or state.evaluator
    v = verify(fn.samples, state.model, model, c.allowed_drop, c.confidence, c.seed, state.verifier is not None,
               c.predict_samples)
    v["on"] = "the exported model in onnxruntime" if model is not res.sim.model else "the sim"
    state.log(f"verification on {v['split']} data: drop {v['drop']:.4f}{interval_text(v)} (allowed {c.allowed_drop}): "
              f"{'confirmed' if v['met'] else 'NOT confirmed'}{'; ' + v['why'] if v['why'] else ''}")
    return v


def _artifact_check_label(info) -> str:
    if info is None:
        return "not run"
    if info.get("error"):
        return f"failed: {info['error']}"
    if info.get("parity_only"):
        return f"parity only: {info.get('why')}"
    return "onnxruntime"


def _message(state: RunState, res: AutoQuantResult) -> str:
    v = res.verification
    if v and state.met and not v["met"]:
        upper = deciding_upper(v)
        interval = "" if upper is None else f" (interval up to {upper:.4f})"
        return (f"{res.best_stage} met the target on the search data, but verification on {v['split']} data "
                f"does not confirm it: drop {v['drop']:.4f}{interval} > allowed {state.config.allowed_drop}"
                + (f"; {v['why']}" if v["why"] else ""))
    msg = _outcome_message(state, res)
    if v and v["met"]:
        msg += f"; verified on {v['split']} data: drop {v['drop']:.4f}{interval_text(v)}"
    return msg


def _outcome_message(state: RunState, res: AutoQuantResult) -> str:
    if state.stop_message:
        return state.stop_message
    budget = state.over_budget()
    if res.met:
        how = "on the exported model in onnxruntime" if res.artifact_check == "onnxruntime" else \
            f"on the sim ({res.artifact_check})"
        return f"target met by {res.best_stage} {how}"
    tail = f"; returning the best result ({res.best_stage}, {_fmt(res.score)})"
    if res.sim_score is not None and state.target is not None and res.sim_score >= state.target:
        return (f"the sim of {res.best_stage} meets the target ({_fmt(res.sim_score)}) but the exported model "
                f"does not ({res.artifact_check}: {_fmt(res.artifact_score)})" + tail)
    if budget:
        return f"{budget}; no stage met the target {_fmt(state.target)}" + tail
    return f"no stage met the target {_fmt(state.target)}" + tail


def _export(state: RunState, res: AutoQuantResult) -> StageRecord:
    """Put the accepted candidate's files in results_dir (the files that were scored)."""
    rec = StageRecord("export")
    info = state.best.artifact
    if not state.config.export:
        rec.status, rec.message = "skipped", "export=False in the config"
        return rec
    if info is None or not info.get("onnx"):
        rec.status = "failed" if info else "skipped"
        rec.message = (info or {}).get("error") or "no quantized result to export"
        return rec
    if D.is_main():
        dst = state.config.results_dir
        res.onnx_path = _copy(info["onnx"], os.path.join(dst, "model.onnx"))
        res.encodings_path = _copy(info["encodings"], os.path.join(dst, "model.encodings.json"))
    res.export_check = {k: info.get(k) for k in ("ort_ok", "ort_max_abs_diff", "qdq_pairs", "parity", "score",
                                                  "parity_only", "why")}
    rec.status = "ok"
    rec.artifact_score = info.get("score")
    rec.message = (f"ONNX runs in onnxruntime (default options): {info.get('ort_ok')}; max |sim - ort| on the "
                   f"dummy input = {info.get('ort_max_abs_diff')}; artifact check: {res.artifact_check}")
    rec.artifacts = {"onnx": res.onnx_path, "encodings": res.encodings_path}
    return rec


def _latency(state: RunState, res: AutoQuantResult) -> dict:
    """The exported file's onnxruntime latency beside its float twin's (rank 0; the
    result says why when it could not be measured)."""
    threads = state.config.latency_threads
    if threads is None or not res.onnx_path or not D.is_main():
        return {}
    from rapidquant.export.latency import float_and_quantized
    try:
        lat = float_and_quantized(res.sim, state.dummy_input, res.onnx_path,
                                  os.path.join(state.cache.dir, "artifacts", "latency"), threads=threads)
    except Exception as e:  # noqa: BLE001 - a measurement, not the product: report and go on
        return {"error": f"{type(e).__name__}: {e}"}
    state.log(f"latency in onnxruntime ({threads} thread{'s' if threads > 1 else ''}): quantized "
              f"{lat['quantized_ms']:.3f} ms, float {lat['float_ms']:.3f} ms ({lat['speedup']:.2f}x)")
    return lat


def _copy(src: str, dst: str) -> str:
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


__all__ = ["AutoQuant", "finish"]

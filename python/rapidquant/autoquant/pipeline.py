"""The flow as data, and the one runner that executes any stage.

PIPELINE is the ordered tuple of stage descriptors; the module docstring of the package
and the report both read it. The runner owns what every stage needs: budgets, the cache,
timing, failure capture (a failed stage changes nothing), the record, and acceptance: a
candidate whose sim meets the target is exported and scored in onnxruntime, and only the
file's score can end the run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

from rapidquant.autoquant import artifact, stages as S
from rapidquant.autoquant.state import Best, Outcome, RunState, StageRecord
from rapidquant.memory import release_free_memory, start_peak_window, window_peak_rss_mb


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[RunState], Outcome]
    doc: str
    skip: Callable[[RunState], str | None] = lambda state: None   # a reason not to run, or None
    after: Callable[[RunState, Outcome], None] | None = None      # facts it establishes for later stages
    essential: bool = False    # runs whatever the budget (the run is meaningless without it)
    cached: bool = True        # kept in the stage cache (AMP keeps its own finer cache)


def _set_target(state: RunState, out: Outcome) -> None:
    state.fp32_score = out.score
    state.target = out.score - state.config.allowed_drop
    state.log(f"target: {state.target:.4f} (FP32 {out.score:.4f} - allowed drop {state.config.allowed_drop})")


def _set_schemes(state: RunState, out: Outcome) -> None:
    state.schemes = tuple(out.artifacts["chosen"])


def _w32_verdict(state: RunState, out: Outcome) -> None:
    if out.score is not None and out.score < state.target and not state.config.amp_candidates:
        state.stop_message = ("stopped early: activation quantization alone misses the target even after BN "
                              "folding and CLE (try higher activation bitwidths, AMP candidates with 16-bit "
                              "activations, or a larger allowed drop)")


def _w32_failed(state: RunState) -> bool:
    out = state.output("w32_check")
    return out is not None and out.score is not None and out.score < state.target


def _rounding_skip(enabled: Callable[[RunState], bool]):
    """The skip rule of a stage that learns weight rounding (AdaRound, block reconstruction)."""
    def skip(state: RunState) -> str | None:
        if not enabled(state):
            return "disabled in the config"
        if _w32_failed(state):
            return "W32 check failed: weight rounding cannot recover activation error"
        return None
    return skip


def _adaround_skip(state: RunState) -> str | None:
    """AdaRound's skip rule; below 8-bit activations block reconstruction (next) takes its place:
    it learns the rounding together with the activation steps, which is what pays there
    (bench/README.md: W4A4 Fashion MobileNet 0.594 after AdaRound, 0.89 after reconstruction)."""
    why = _rounding_skip(lambda s: s.config.use_adaround)(state)
    act_bw = state.config.sim.act_bw
    if why is None and state.config.use_block_reconstruction and act_bw is not None and act_bw < 8 \
            and state.config.sim.dtype == "int" and state.config.sim.act_dtype in (None, "int"):
        why = (f"{act_bw}-bit activations: block reconstruction (next) learns the rounding with the "
               "activation steps instead")
    return why


# below this many iterations per layer/block a short schedule is not worth a try of its own
SHORT_MIN_ITERATIONS = 50


def _short_skip(full_skip: Callable[[RunState], str | None], config_of: Callable):
    """The skip rule of a short-schedule stage: it runs where the full stage would, when the
    short schedule is shorter by a useful margin."""
    def skip(state: RunState) -> str | None:
        why = full_skip(state)
        if why is None and state.config.short_schedule is None:
            why = "short_schedule=None in the config: the full schedule only"
        elif why is None:
            its = S.short_iterations(state, config_of(state))
            if its < SHORT_MIN_ITERATIONS:
                why = f"the short schedule would be {its} iterations (< {SHORT_MIN_ITERATIONS}): the full one only"
        return why
    return skip


_block_skip = _rounding_skip(lambda s: s.config.use_block_reconstruction)


def _amp_skip(state: RunState) -> str | None:
    if not state.config.amp_candidates:
        return "no AMP candidates given"
    if state.best.sim is None:
        return "no quantized model to start from"
    return None


PIPELINE: tuple[Stage, ...] = (
    Stage("prepare", S.prepare, "capture the model and check every module can be quantized", essential=True,
          cached=False),
    Stage("fp32", S.fp32, "score the float model; target = FP32 - allowed drop", after=_set_target, essential=True),
    Stage("bn_fold", S.bn_fold, "fold BatchNorms into neighbouring layers: every later stage quantizes the "
          "folded model"),
    Stage("scheme_selection", S.scheme_selection,
          "on the BN-folded model: one calibration; output-SQNR proxy for every range scheme, eval_fn for the "
          "best few", after=_set_schemes),
    Stage("w32_check", S.w32_check, "activations only, on the BN-folded and equalized model: stop early when "
          "no weight technique can help", after=_w32_verdict),
    Stage("cle", S.cle, "cross-layer equalization (and high-bias folding) on the BN-folded model"),
    Stage("adaround_short", S.adaround_short_stage, "AdaRound on a short schedule (short_schedule of its "
          "iterations): the full schedule runs only if this misses",
          skip=_short_skip(_adaround_skip, S.adaround_config)),
    Stage("adaround", S.adaround_stage, "learn the weight rounding layer by layer", skip=_adaround_skip),
    Stage("block_reconstruction_short", S.block_reconstruction_short_stage,
          "block reconstruction on a short schedule: the full schedule runs only if this misses",
          skip=_short_skip(_block_skip, S.block_config)),
    Stage("block_reconstruction", S.block_reconstruction_stage,
          "learn the rounding and activation steps of each residual/transformer block jointly (BRECQ/QDrop)",
          skip=_block_skip),
    Stage("amp", S.amp_stage, "mixed precision over the AMP candidates, from the best result so far",
          skip=_amp_skip, cached=False),
)
STAGES = tuple(s.name for s in PIPELINE) + ("export",)


def run_pipeline(state: RunState) -> None:
    """Run the stages in order until the target is met on the artifact or the run stops."""
    for stage in PIPELINE:
        if state.met or state.stop_message:
            reason = "not needed: target met" if state.met else "run stopped"
            state.stages[stage.name] = StageRecord(stage.name, "skipped", message=reason)
            continue
        rec = run_stage(state, stage)
        if stage.essential and rec.status == "failed":
            raise RuntimeError(f"AutoQuant cannot go on: the {stage.name} stage failed: {rec.message}")


def run_stage(state: RunState, stage: Stage) -> StageRecord:
    release_free_memory()
    window = start_peak_window()
    rec = _run_stage(state, stage)
    rec.peak_rss_mb = window_peak_rss_mb(window)  # this stage's own peak (Linux)
    return rec


def _run_stage(state: RunState, stage: Stage) -> StageRecord:
    rec = StageRecord(stage.name)
    state.stages[stage.name] = rec
    why = stage.skip(state) or (None if stage.essential else state.over_budget())
    if why:
        rec.status, rec.message = "skipped", why
        state.log(f"{stage.name}: skipped ({why})")
        return rec
    t0, ev0, cal0 = time.perf_counter(), state.evaluator.count, state.calibrations
    cached = state.cache.record(stage.name) if stage.cached else None
    if cached is not None:
        out = state.cache.restore(cached, state, lambda m, art: S.build_sim(state, m, art.get("chosen")))
        rec = cached
        rec.status, rec.message = "ok", (rec.message + " (from cache)").strip()
        state.stages[stage.name] = rec
        state.log(f"{stage.name}: {_fmt(rec.score)} (cached)")
    else:
        try:
            out = stage.run(state)
        except Exception as e:  # noqa: BLE001 - a failing stage is an outcome; the state is untouched
            rec.status, rec.seconds = "failed", time.perf_counter() - t0
            rec.message = f"{type(e).__name__}: {e}"
            state.log(f"{stage.name}: FAILED in {rec.seconds:.1f} s: {rec.message}")
            if state.config.strict:
                raise
            return rec
        rec.status, rec.score, rec.message = "ok", out.score, out.message
        rec.seconds = time.perf_counter() - t0
        rec.evaluations, rec.calibrations = state.evaluator.count - ev0, state.calibrations - cal0
        rec.artifacts = dict(out.artifacts)
        if getattr(out.sim, "widened", None):  # grids calibration raised: said with every stage that has them
            rec.artifacts["widened"] = dict(out.sim.widened)
        if getattr(out.sim, "bias_fits", None):  # weight grids widened for their int32 bias, likewise
            rec.artifacts["bias_fits"] = {f.layer: f.why() for f in out.sim.bias_fits.values()}
        if getattr(out.sim, "saturated_biases", None):
            rec.artifacts["saturated_biases"] = dict(out.sim.saturated_biases)
        cancelling = [w for w in getattr(out.sim, "calibration_warnings", []) if w.get("kind") == "cancellation"]
        if cancelling:
            from rapidquant.cancellation import describe
            rec.artifacts["cancelling"] = {w["name"]: describe(w) for w in cancelling}
        state.log(f"{stage.name}: {_fmt(out.score)} in {rec.seconds:.1f} s {out.message}")
    state.outputs[stage.name] = out
    if stage.after is not None:
        stage.after(state, out)
    if out.candidate and out.sim is not None and out.score is not None:
        consider(state, rec, out)  # may export the candidate and score the file: part of the stage's cost
        if cached is None:
            rec.seconds = time.perf_counter() - t0
            rec.evaluations, rec.calibrations = state.evaluator.count - ev0, state.calibrations - cal0
    if cached is None and stage.cached:
        state.cache.save(rec, out)
    return rec


def consider(state: RunState, rec: StageRecord, out: Outcome) -> None:
    """Make out the best candidate if it scores higher; a best candidate whose sim meets
    the target is exported and scored as a file before the run may stop."""
    b = state.best
    if b.score is not None and out.score <= b.score:
        return
    state.best = Best(rec.name, out.score, out.sim, out.model)
    if state.target is None or out.score < state.target:
        return
    info = accept(state, rec, out)
    prefer_checked(state)
    if state.met:
        rec.status = "met"
    elif info.get("score") is not None:
        state.log(f"{rec.name}: the sim meets the target ({out.score:.4f}) but the exported model scores "
                  f"{info['score']:.4f} in onnxruntime; going on to the next stage")
    else:
        state.log(f"{rec.name}: the sim meets the target but the exported model could not be accepted: "
                  f"{info.get('error') or info.get('why')}; going on")


def accept(state: RunState, rec: StageRecord, out: Outcome) -> dict:
    """Export the best candidate and score the file; the file's score becomes its score."""
    info = rec.artifacts.get("artifact_check")
    if not (info and info.get("onnx") and os.path.exists(info["onnx"])):  # not already checked (cache)
        info = artifact.check(state, out.sim, os.path.join(state.cache.dir, "artifacts", rec.name))
    rec.artifacts["artifact_check"] = info
    rec.artifact_score = info.get("score")
    state.best.artifact = info
    state.checked.append(state.best)
    if info.get("score") is not None:
        state.best.score = info["score"]
    elif not info.get("parity_only"):
        state.best.score = None if info.get("error") else state.best.score
    return info


def prefer_checked(state: RunState) -> None:
    """The best candidate is the one whose file scored highest: a candidate whose sim beat
    an earlier one but whose file scores lower does not replace it."""
    scored = [c for c in state.checked if c.score is not None]
    if scored and (state.best.score is None or max(c.score for c in scored) > state.best.score):
        state.best = max(scored, key=lambda c: c.score)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"

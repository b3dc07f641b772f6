"""AutoQuant's stages: each is a function of the run state returning an Outcome.

Stages never modify the state or the user's model; they work on copies and hand back
what they built. The runner (pipeline.py) records, caches and accepts their outcomes.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, replace

import torch

from rapidquant import distributed as D
from rapidquant.autoquant.state import Outcome, RunState
from rapidquant.calibration import HIST_SCHEMES
from rapidquant.int32_bias import fit_int32_biases
from rapidquant.progress import progress
from rapidquant.quantsim import QuantSim
from rapidquant.scoring import model_outputs, output_sqnr
from rapidquant.techniques import AdaRoundConfig, adaround, equalize_, fold_batch_norms_
from rapidquant.techniques.adaround import CACHE_FP16_OVER_MB


# ---------------------------------------------------------------- shared helpers
def build_sim(state: RunState, model, schemes=None) -> QuantSim:
    """An uncalibrated sim of (a copy of) model with the run's sim config and schemes."""
    ps, as_ = schemes or state.schemes
    return QuantSim(model, state.dummy_input, replace(state.config.sim, param_scheme=ps, act_scheme=as_))


def calibrated_sim(state: RunState, model, schemes=None, adaround_result=None) -> QuantSim:
    sim = build_sim(state, model, schemes)
    if adaround_result is not None:
        adaround_result.apply_to(sim)
    sim.compute_encodings(state.batches, show_progress=state.show_progress and D.is_main())
    state.calibrations += 1
    return sim


def proxy_batches(state: RunState) -> list:
    return state.batches[: state.config.num_proxy_batches]


def folded_model(state: RunState):
    """The user's model with its BNs folded (computed once per run), and the fold report."""
    if "folded" not in state.models:
        m = copy.deepcopy(state.model).eval()
        state.models["folded"] = (m, fold_batch_norms_(m))
    return state.models["folded"]


def equalized_model(state: RunState):
    """The BN-folded model after cross-layer equalization (computed once per run)."""
    if "equalized" not in state.models:
        m = copy.deepcopy(folded_model(state)[0])
        state.models["equalized"] = (m, equalize_(m))
    return state.models["equalized"]


def set_schemes(sim: QuantSim, schemes) -> None:
    """Re-derive every encoding for (param_scheme, act_scheme) from the kept statistics:
    no calibration pass (statistics do not depend on the scheme)."""
    ps, as_ = schemes
    params = sim.param_quantizers()
    for name, q in sim.quantizers().items():
        q.scheme = ps if name in params else as_
    sim.calibrate_params()
    for q in sim.activation_quantizers().values():
        if q.enabled and q.stats is not None and not q.frozen:
            q.compute_encoding()
    fit_int32_biases(sim)


# ---------------------------------------------------------------- the stages
def prepare(state: RunState) -> Outcome:
    sim = build_sim(state, state.model)
    how = getattr(sim, "capture_method", "torch.fx")
    leaves = getattr(sim, "float_leaves", None) or {}
    msg = f"captured with {how}; {len(sim.quantizers())} quantizers"
    weights = getattr(sim, "float_weights", None) or {}
    if leaves:
        msg += f"; kept in float (output quantized): {', '.join(leaves)}"
    if weights:
        msg += f"; weights left in float: {', '.join(weights)}"
    return Outcome(message=msg, candidate=False, artifacts={
        "capture": how, "float_leaves": dict(leaves),
        "float_weights": {k: f"read by {v}, which has no weight quantizer" for k, v in weights.items()}})


def fp32(state: RunState) -> Outcome:
    return Outcome(state.evaluator(state.model, "the FP32 model"), candidate=False)


def scheme_selection(state: RunState) -> Outcome:
    """One calibration pass on the BN-folded model (what a target runs: converters fold BNs
    into the weights, so a scheme must suit the folded weights); every scheme candidate's
    encodings come from its statistics. The proxy (output SQNR) ranks all candidates, eval_fn
    decides among the best few. The chosen sim is the BN-folded model's result."""
    c = state.config
    cands = [tuple(s) for s in c.scheme_candidates]
    hist_act = next((a for _, a in cands if a in HIST_SCHEMES), cands[0][1])
    folded, fold = folded_model(state)
    m = copy.deepcopy(folded)
    sim = calibrated_sim(state, m, (cands[0][0], hist_act))
    ref = model_outputs(state.model, proxy_batches(state), sim.n_inputs)
    proxies = {}
    for i, sch in enumerate(progress(cands, desc="scheme selection", enabled=state.show_progress and D.is_main())):
        set_schemes(sim, sch)
        proxies[i] = output_sqnr(sim.model, proxy_batches(state), ref, sim.n_inputs)
    top = sorted(proxies, key=lambda i: -proxies[i])[: c.schemes_fully_evaluated]
    scores = {}
    for j, i in enumerate(top):  # under torch.distributed each rank evaluates its share
        if D.mine(j):
            set_schemes(sim, cands[i])
            scores[i] = state.evaluator(sim.model, f"scheme {cands[i]}")
            if not D.active() and state.target is not None and scores[i] >= state.target:
                break  # the run stops at the first that meets the target: the rest need no eval_fn
    for part in D.gather_objects(scores):
        scores.update(part)
    top = [i for i in top if i in scores]
    chosen = max(top, key=lambda i: scores[i])
    set_schemes(sim, cands[chosen])
    table = [{"scheme": list(cands[i]), "proxy_sqnr_db": proxies[i], **({"score": scores[i]} if i in scores else {})}
             for i in sorted(proxies, key=lambda i: -proxies[i])]
    msg = (f"one calibration pass; proxy (output SQNR) for {len(cands)} schemes, eval_fn for the best "
           f"{len(top)}; chose param={cands[chosen][0]}, act={cands[chosen][1]}")
    if len(top) < min(c.schemes_fully_evaluated, len(cands)):
        msg += " (it met the target: the next by proxy were not evaluated)"
    if fold.folded:
        msg += f"; on the BN-folded model ({len(fold.folded)} BNs folded)"
    return Outcome(scores[chosen], m, sim, {"schemes": table, "chosen": list(cands[chosen])}, msg)


def w32_check(state: RunState) -> Outcome:
    """Activations quantized, weights float, on the BN-folded and equalized model (CLE
    changes activation ranges): if this misses the target, no weight technique can help."""
    m, _ = equalized_model(state)
    sim = build_sim(state, m)
    for q in sim.param_quantizers().values():
        q.enabled = False
    sim.compute_encodings(state.batches, show_progress=state.show_progress and D.is_main())
    state.calibrations += 1
    score = state.evaluator(sim.model, "activation-only quantization")
    msg = "weights float, activations quantized, on the BN-folded and equalized model"
    if state.target is not None and score < state.target:
        msg += (f"; activation quantization alone scores {score:.4f} < target {state.target:.4f}: "
                "no weight technique can recover that")
    return Outcome(score, message=msg, candidate=False)


def bn_fold(state: RunState) -> Outcome:
    """Fold BatchNorms into their neighbouring layers: every scored stage after it (scheme
    selection first) quantizes the folded model, as a target runs it. Nothing is scored here."""
    _, r = folded_model(state)
    untreated = dict(r.not_folded)  # bn name -> why it stays
    return Outcome(artifacts={"folded": r.folded, "not_folded": untreated}, candidate=False,
                   message=f"folded {len(r.folded)} BNs" + (f"; left {len(untreated)} unfolded (see artifacts)"
                                                            if untreated else ""))


def cle(state: RunState) -> Outcome:
    m, r = equalized_model(state)
    m = copy.deepcopy(m)
    sim = calibrated_sim(state, m)
    msg = f"equalized {len(r.scaled)} layer pairs, high-bias folded {len(r.high_bias_folded)}"
    if r.skipped:
        msg += f"; skipped {len(r.skipped)} (see artifacts)"
    return Outcome(state.evaluator(sim.model, "equalized model"), m, sim,
                   {"scaled": r.scaled, "skipped": r.skipped}, msg)


# they write rounded weights
ROUNDING_STAGES = ("adaround_short", "adaround", "block_reconstruction_short", "block_reconstruction")


def adaround_input(state: RunState):
    """The model AdaRound starts from: the better of the BN-folded (scheme selection's) and
    equalized models."""
    done = [o for o in (state.output("scheme_selection"), state.output("cle"))
            if o is not None and o.score is not None and o.model is not None]
    return max(done, key=lambda o: o.score).model if done else state.model


def unrounded_weights(state: RunState, sim: QuantSim) -> dict:
    """AdaRound (and block reconstruction) wrote their rounding into the weights; a layer AMP
    moves to another precision must start from the weights before rounding (same names in
    their input model)."""
    if state.best.stage not in ROUNDING_STAGES:
        return {}
    before = adaround_input(state)
    out = {}
    for name, q in sim.param_quantizers().items():
        if q.frozen:
            try:
                out[name] = before.get_parameter(name)
            except AttributeError:
                pass  # not a parameter of the float model under that name: keeps its rounded weights
    return out


def _on_the_sim_grid(state: RunState, cfg):
    """A rounding config (AdaRound, block reconstruction) with the sim's weight grid, the
    chosen param scheme and the run's seed."""
    sim_cfg = state.config.sim
    return replace(cfg, param_bw=sim_cfg.param_bw or 8, per_channel=sim_cfg.per_channel, hw_config=sim_cfg.hw_config,
                   param_scheme=state.schemes[0], seed=state.config.seed, block_size=sim_cfg.block_size)


def adaround_config(state: RunState) -> AdaRoundConfig:
    return _on_the_sim_grid(state, state.config.adaround or AdaRoundConfig())


def block_config(state: RunState):
    from rapidquant.techniques.block_reconstruction import BlockReconConfig
    return _on_the_sim_grid(state, state.config.block_reconstruction or BlockReconConfig())


def short_iterations(state: RunState, cfg) -> int:
    """A short schedule's iterations per layer or block (AutoQuantConfig.short_schedule of cfg's)."""
    return int(round(state.config.short_schedule * cfg.iterations))


def _schedule(cfg, iterations: int | None, unit: str):
    """(cfg with ``iterations`` when given, the message's note on the short schedule)."""
    if iterations is None:
        return cfg, ""
    note = f" (short schedule: at most {iterations} of {cfg.iterations} per {unit})"
    return replace(cfg, iterations=iterations), note


def adaround_stage(state: RunState, iterations: int | None = None) -> Outcome:
    """AdaRound on the better of the BN-folded and equalized models (deployed models have
    their BNs folded, so the rounding is learned on folded weights); ``iterations``: a
    shorter schedule than the config's (its annealing compressed to fit)."""
    cfg, short = _schedule(adaround_config(state), iterations, "layer")
    start = adaround_input(state)
    r = adaround(start, state.dummy_input, state.batches, cfg, show_progress=state.show_progress,
                 sim_config=state.config.sim)
    sim = calibrated_sim(state, r.model, adaround_result=r)
    layers = [asdict(layer) for layer in r.layers]
    msg = f"rounded {len(layers)} layers in {sum(layer['iterations'] for layer in layers)} iterations{short}"
    if r.skipped:
        msg += f"; left {len(r.skipped)} layers with nearest rounding (see artifacts)"
    if r.fp16_cached[0]:
        msg += (f"; its layer cache kept {r.fp16_cached[0]} of {r.fp16_cached[1]} values in fp16, past "
                f"{CACHE_FP16_OVER_MB} MB (cache_fp16)")
    return Outcome(state.evaluator(sim.model, "AdaRound model"), r.model, sim,
                   {"layers": layers, "skipped": [list(s) for s in r.skipped]}, msg)


def adaround_short_stage(state: RunState) -> Outcome:
    """AdaRound on a short schedule: when its file meets the target, the full one never runs."""
    return adaround_stage(state, short_iterations(state, adaround_config(state)))


def block_reconstruction_stage(state: RunState, iterations: int | None = None) -> Outcome:
    """Block reconstruction (rounding and activation steps learned per residual/transformer
    block) on the model AdaRound starts from. The sim keeps the learned activation steps:
    they are loaded, frozen, after calibration (which still collects every statistic AMP
    may need to re-derive an encoding at another bitwidth). ``iterations``: a shorter
    schedule than the config's."""
    from rapidquant.techniques.block_reconstruction import reconstruct_blocks
    sim_cfg = state.config.sim
    cfg, short = _schedule(block_config(state), iterations, "block")
    r = reconstruct_blocks(adaround_input(state), state.dummy_input, state.batches, cfg,
                           show_progress=state.show_progress, sim_config=replace(sim_cfg, act_scheme=state.schemes[1]))
    sim = build_sim(state, r.model)
    sim.compute_encodings(state.batches, show_progress=state.show_progress and D.is_main())
    state.calibrations += 1
    r.apply_to(sim)
    blocks = [asdict(b) for b in r.blocks]
    msg = (f"reconstructed {len(blocks)} blocks ({sum(len(b['layers']) for b in blocks)} layers) in "
           f"{sum(b['iterations'] for b in blocks)} iterations{short}")
    if r.skipped:
        msg += f"; left {len(r.skipped)} layers with nearest rounding (see artifacts)"
    return Outcome(state.evaluator(sim.model, "block-reconstructed model"), r.model, sim,
                   {"blocks": blocks, "skipped": [list(s) for s in r.skipped]}, msg)


def block_reconstruction_short_stage(state: RunState) -> Outcome:
    """Block reconstruction on a short schedule: when its file meets the target, the full one
    never runs."""
    return block_reconstruction_stage(state, short_iterations(state, block_config(state)))


def amp_stage(state: RunState) -> Outcome:
    """Mixed precision from the best candidate so far; works on a copy of its sim, so a
    failure leaves the best result as it was."""
    from rapidquant.mixed_precision import amp
    c = state.config
    sim = copy.deepcopy(state.best.sim)
    float_weights = unrounded_weights(state, sim)
    r = amp(sim, c.amp_candidates, lambda m: state.evaluator(m, "AMP point"), c.allowed_drop, state.batches,
            num_proxy_batches=c.num_proxy_batches, results_dir=os.path.join(c.results_dir, "amp"),
            fp32_score=state.fp32_score, show_progress=state.show_progress, eval_fingerprint=c.eval_fingerprint,
            float_weights=float_weights, cost=c.amp_cost, latency_threads=c.latency_threads or 1)  # None: bitops only
    state.calibrations += r.calibration_passes
    artifacts = {"pareto_plot": r.plot_path, "pareto_front": [asdict(p) for p in r.pareto_front],
                 "chosen": asdict(r.chosen) if r.chosen else None, "proxy_evaluations": r.proxy_evaluations,
                 "cost": r.cost, "float_latency_ms": r.float_latency_ms}
    score = r.chosen.score if r.chosen else None
    model = state.best.model
    if float_weights:  # the model the sim now reads: float weights where AMP left AdaRound's precision
        model, params = copy.deepcopy(model), sim.parameters_quantized()
        with torch.no_grad():
            for name in float_weights:
                model.get_parameter(name).copy_(params[name])
    return Outcome(score, model, sim, artifacts, r.message)

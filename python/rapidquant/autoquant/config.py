"""AutoQuantConfig: the run's settings. It holds a QuantSimConfig (and the AdaRound config)
instead of copying their fields, so every QuantSim knob reaches AutoQuant unchanged."""
from __future__ import annotations

import dataclasses
import numbers
import warnings
from dataclasses import dataclass, field, replace

from rapidquant.calibration import SCHEMES
from rapidquant.config import QuantSimConfig
from rapidquant.techniques import AdaRoundConfig, BlockReconConfig

CONFIG_VERSION = 2
DEFAULT_SCHEMES = (("minmax", "minmax"), ("mse", "sqnr"), ("mse", "percentile"), ("mse", "mse"))
# fields of version 1 that now live in `sim` (accepted for one release, with a warning)
_LEGACY_SIM_FIELDS = ("param_bw", "act_bw", "per_channel", "hw_config", "percentile")


@dataclass(frozen=True)
class AutoQuantConfig:
    """AutoQuant settings.

    sim: how every candidate is quantized (bitwidths, granularity, block size, float
    dtypes, excluded modules, hw config...); the scheme candidates override its
    param/act schemes. allowed_drop: absolute, in eval_fn's units. verify_artifact: score
    the exported ONNX model in onnxruntime before calling the target met (the reported
    score is the artifact's). eval_fingerprint: any string that changes when eval_fn
    changes (it keys the stage caches). confidence: with per-sample eval results, the
    final answer is met only when the upper end of the drop's bootstrap interval at this
    level is within allowed_drop. predict_samples: the size of the test the user will run on
    the result; the verification then also gives the interval of the drop that test will show
    (wider: it has its own sampling noise), and that interval decides 'met'.
    """
    sim: QuantSimConfig = field(default_factory=lambda: QuantSimConfig(param_bw=8, act_bw=8))
    allowed_drop: float = 0.01
    scheme_candidates: tuple = DEFAULT_SCHEMES   # (param_scheme, act_scheme) pairs
    schemes_fully_evaluated: int = 2             # the best this many by proxy get eval_fn
    num_calibration_batches: int | None = 16
    num_proxy_batches: int = 4
    use_adaround: bool = True
    adaround: AdaRoundConfig | None = None       # None: defaults at the sim's weight bitwidth
    # AdaRound and block reconstruction first run this fraction of their iterations (the same
    # annealing, compressed); the full schedule runs only when that result misses the target.
    # None: the full schedules only
    short_schedule: float | None = 0.2
    use_block_reconstruction: bool = True        # after AdaRound when still missed; in its place below A8
    block_reconstruction: BlockReconConfig | None = None  # None: defaults at the sim's weight bitwidth
    amp_candidates: tuple | None = None          # e.g. ("W8A8", "W8A16", "W16A16")
    amp_cost: str = "bitops"                     # AMP's cheapest point: fewest "bitops", or "latency" in onnxruntime
    results_dir: str = "rapidquant-results"
    time_budget_s: float | None = None
    max_evaluations: int | None = None           # eval_fn calls; no new stage starts beyond it
    seed: int = 0
    strict: bool = False
    export: bool = True
    verify_artifact: bool = True
    eval_fingerprint: str | None = None
    confidence: float | None = None              # e.g. 0.95: met needs the drop's interval within allowed_drop
    predict_samples: int | None = None           # with confidence: the interval of the drop that many new samples show decides
    latency_threads: int | None = 1              # time the exported file against its float twin; None: skip
    version: int = CONFIG_VERSION
    # version-1 fields, folded into `sim` (deprecated)
    param_bw: int | None = None
    act_bw: int | None = None
    per_channel: bool | None = None
    hw_config: str | dict | None = None
    percentile: float | None = None

    def __post_init__(self):
        legacy = {k: getattr(self, k) for k in _LEGACY_SIM_FIELDS if getattr(self, k) is not None}
        if legacy:
            warnings.warn(f"AutoQuantConfig({', '.join(legacy)}=...) is deprecated: pass "
                          f"AutoQuantConfig(sim=QuantSimConfig({', '.join(legacy)}=...))", DeprecationWarning,
                          stacklevel=3)
            object.__setattr__(self, "sim", replace(self.sim, **legacy))
            for k in legacy:
                object.__setattr__(self, k, None)
        _validate(self)

    def to_dict(self) -> dict:
        """Plain data (for cache keys and reports), with the config version."""
        return _plain(dataclasses.asdict(self))


def _validate(c: AutoQuantConfig) -> None:
    def bad(name, why):
        raise ValueError(f"AutoQuantConfig.{name}={getattr(c, name)!r}: {why}")
    if not isinstance(c.sim, QuantSimConfig):
        bad("sim", "expected a rapidquant.QuantSimConfig")
    if not isinstance(c.allowed_drop, (int, float)) or not c.allowed_drop >= 0:
        bad("allowed_drop", "must be a number >= 0 (an absolute drop in eval_fn's units)")
    if not c.scheme_candidates:
        bad("scheme_candidates", "must not be empty")
    for pair in c.scheme_candidates:
        if len(pair) != 2 or any(s not in SCHEMES for s in pair):
            bad("scheme_candidates", f"each entry is a (param_scheme, act_scheme) pair from {SCHEMES}; got {pair!r}")
    if c.schemes_fully_evaluated < 1:
        bad("schemes_fully_evaluated", "must be >= 1")
    if c.num_calibration_batches is not None and c.num_calibration_batches < 1:
        bad("num_calibration_batches", "must be >= 1 (or None for all batches)")
    if c.num_proxy_batches < 1:
        bad("num_proxy_batches", "must be >= 1")
    if c.time_budget_s is not None and not c.time_budget_s >= 0:
        bad("time_budget_s", "must be >= 0 seconds (or None)")
    if c.max_evaluations is not None and c.max_evaluations < 1:
        bad("max_evaluations", "must be >= 1 (or None); the FP32 score alone takes one")
    if c.amp_candidates is not None:
        from rapidquant.mixed_precision.groups import parse_candidate
        if len(c.amp_candidates) < 2:
            bad("amp_candidates", "give at least two candidates, e.g. ('W8A8', 'W8A16'), or None")
        for cand in c.amp_candidates:
            try:
                parse_candidate(cand)
            except ValueError as e:
                bad("amp_candidates", str(e))
    if c.amp_cost not in ("bitops", "latency"):
        bad("amp_cost", "must be 'bitops' or 'latency' (measured in onnxruntime on this machine)")
    if c.amp_cost == "latency" and c.latency_threads is None:
        bad("amp_cost", "'latency' times files with latency_threads threads: give a thread count, not None")
    if c.latency_threads is not None and (not isinstance(c.latency_threads, int) or c.latency_threads < 1):
        bad("latency_threads", "must be a thread count >= 1, or None to skip the latency measurement")
    if c.confidence is not None and not 0.5 <= c.confidence < 1:
        bad("confidence", "must be in [0.5, 1), e.g. 0.95, or None")
    if c.predict_samples is not None and (isinstance(c.predict_samples, bool) or
                                          not isinstance(c.predict_samples, numbers.Integral) or c.predict_samples < 1):
        bad("predict_samples", "must be a number of samples >= 1 (the size of your own test), or None")
    if c.predict_samples is not None and c.confidence is None:
        bad("predict_samples", "needs a confidence level (e.g. confidence=0.95) and per-sample eval results")
    if c.short_schedule is not None and (isinstance(c.short_schedule, bool) or
                                         not isinstance(c.short_schedule, numbers.Real) or not 0 < c.short_schedule < 1):
        bad("short_schedule", "must be a fraction of the rounding stages' iterations in (0, 1), e.g. 0.2, or None "
            "to run only the full schedules")
    if c.adaround is not None and not isinstance(c.adaround, AdaRoundConfig):
        bad("adaround", "expected a rapidquant.AdaRoundConfig or None")
    if c.block_reconstruction is not None and not isinstance(c.block_reconstruction, BlockReconConfig):
        bad("block_reconstruction", "expected a rapidquant.BlockReconConfig or None")
    if c.version != CONFIG_VERSION:
        bad("version", f"this rapidquant reads version {CONFIG_VERSION}")


def _plain(v):
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)  # module types in `exclude`

"""The records AutoQuant's stages read and write: the run state, a stage's outcome, the
per-stage record and the final result."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from torch import nn

from rapidquant.autoquant.config import AutoQuantConfig
from rapidquant.quantsim import QuantSim


@dataclass
class Outcome:
    """What a stage hands back. ``sim`` is a candidate result when ``candidate`` is set;
    ``model`` is the float model it was built on (the next stage's input)."""
    score: float | None = None
    model: nn.Module | None = None
    sim: QuantSim | None = None
    artifacts: dict = field(default_factory=dict)
    message: str = ""
    candidate: bool = True        # False: the score only informs (e.g. BNs still unfolded)


@dataclass
class StageRecord:
    name: str
    status: str = "pending"        # ok | met | failed | skipped | cached
    score: float | None = None     # the sim's score (eval_fn on the torch sim)
    artifact_score: float | None = None  # the exported ONNX model's score in onnxruntime
    seconds: float = 0.0
    evaluations: int = 0           # eval_fn calls made by this stage
    calibrations: int = 0          # calibration passes made by this stage
    # peak resident memory during the stage in MiB (Linux; elsewhere the process's peak by its end)
    peak_rss_mb: float | None = None
    message: str = ""
    artifacts: dict = field(default_factory=dict)


@dataclass
class Best:
    """The best candidate so far: the sim, its float model and where it came from."""
    stage: str | None = None
    score: float | None = None
    sim: QuantSim | None = None
    model: nn.Module | None = None
    artifact: dict | None = None   # export + artifact score, once checked


@dataclass
class RunState:
    """Everything a stage may read; stages return Outcomes, the runner updates the state."""
    model: nn.Module
    dummy_input: object
    batches: list
    config: AutoQuantConfig
    evaluator: object              # autoquant.evaluation.Evaluator
    log: object                    # callable(str)
    show_progress: bool = True
    cache: object = None           # autoquant.cache.StageCache
    verifier: object = None        # Evaluator of the user's held-out verification function, or None
    fp32_score: float | None = None
    target: float | None = None
    schemes: tuple = ("minmax", "minmax")
    stages: dict = field(default_factory=dict)      # name -> StageRecord
    outputs: dict = field(default_factory=dict)     # name -> Outcome of completed stages
    models: dict = field(default_factory=dict)      # shared transformed models (BN-folded, equalized)
    best: Best = field(default_factory=Best)
    checked: list = field(default_factory=list)     # Bests whose files were exported and scored
    calibrations: int = 0
    started: float = field(default_factory=time.perf_counter)
    stop_message: str | None = None                 # set by a stage that ends the run early

    @property
    def met(self) -> bool:
        """The best candidate meets the target on the deployed artifact (or, when artifact
        checking is off or impossible, on the sim)."""
        b = self.best
        if b.score is None or self.target is None:
            return False
        if b.artifact is not None and b.artifact.get("score") is not None:
            return b.artifact["score"] >= self.target
        return b.score >= self.target and (b.artifact is None or not self.config.verify_artifact
                                           or b.artifact.get("parity_only", False))

    def over_budget(self) -> str | None:
        c = self.config
        if c.time_budget_s is not None and time.perf_counter() - self.started > c.time_budget_s:
            return f"time budget of {c.time_budget_s} s spent"
        if c.max_evaluations is not None and self.evaluator.count >= c.max_evaluations:
            return f"evaluation budget of {c.max_evaluations} eval_fn calls spent"
        return None

    def output(self, name: str) -> Outcome | None:
        return self.outputs.get(name)


@dataclass
class AutoQuantResult:
    model: nn.Module | None
    sim: QuantSim | None
    score: float | None            # the deployed artifact's score when it was checked, else the sim's
    fp32_score: float | None
    target: float | None
    met: bool
    message: str
    stages: list
    best_stage: str | None = None
    sim_score: float | None = None
    artifact_score: float | None = None
    artifact_check: str = "not run"   # "onnxruntime" | "parity only: <why>" | "not run"
    onnx_path: str | None = None
    encodings_path: str | None = None
    report_path: str | None = None
    seconds: float = 0.0
    evaluations: int = 0
    calibrations: int = 0
    config: AutoQuantConfig | None = None
    export_check: dict = field(default_factory=dict)
    verification: dict = field(default_factory=dict)  # autoquant.verify: held-out score, drop, interval
    latency: dict = field(default_factory=dict)  # export.latency: quantized vs float file in onnxruntime

"""AutoQuant: apply rapidquant's techniques in sequence until the allowed accuracy drop
is met on the exported ONNX model.

The pipeline (``PIPELINE``, in order; each stage is a function in ``stages.py``):

  prepare           capture the model; report float leaves
  fp32              score the float model; target = FP32 - allowed_drop
  bn_fold           fold BatchNorms (every later stage quantizes the folded model)
  scheme_selection  one calibration; proxy for every range scheme, eval_fn for the best few
  w32_check         activations only: stop early when no weight technique can help
  cle               cross-layer equalization on the BN-folded model
  adaround_short    AdaRound on a short schedule (short_schedule of its iterations)
  adaround          the full schedule, when the short one misses (below 8-bit activations,
                    block reconstruction takes the place of both when it is on)
  block_reconstruction_short, block_reconstruction
                    learn rounding and activation steps per block (when still missed):
                    a short schedule first, as AdaRound
  amp               mixed precision over the AMP candidates
  export            the accepted candidate's ONNX + encodings into results_dir

A candidate whose sim meets the target is exported and scored in onnxruntime (default
session options) with the user's eval_fn; only that score can end the run. Modules:
config (settings), state (records), evaluation (eval_fn calls), cache (resume),
artifact (export + score), pipeline (the runner), run (the public class and finish).
"""
from rapidquant.autoquant.config import DEFAULT_SCHEMES, AutoQuantConfig
from rapidquant.autoquant.pipeline import PIPELINE, STAGES, Stage
from rapidquant.autoquant.run import AutoQuant
from rapidquant.autoquant.state import AutoQuantResult, StageRecord

__all__ = ["AutoQuant", "AutoQuantConfig", "AutoQuantResult", "StageRecord", "PIPELINE", "STAGES", "Stage",
           "DEFAULT_SCHEMES"]

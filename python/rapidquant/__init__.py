"""rapidquant: a compiled quantization toolkit for PyTorch."""
import torch  # noqa: F401  # torch first: its OpenMP runtime is the one _C shares

from rapidquant._ext import build_info
from rapidquant import ops
from rapidquant.autoquant import AutoQuant, AutoQuantConfig, AutoQuantResult
from rapidquant.config import QuantSimConfig
from rapidquant.graph import register_function, register_module
from rapidquant.quantizer import Quantizer
from rapidquant.quantsim import QuantSim, UnsupportedModuleError
from rapidquant.mixed_precision import AMPResult, SensitivityResult, amp, analyze, lite_mp, set_precision
from rapidquant.techniques import (
    AdaRoundConfig, BiasCorrectionConfig, BlockReconConfig, CLEConfig, SeqMSEConfig, adaround, correct_bias,
    equalize, equalize_, fold_batch_norms, fold_batch_norms_, fold_batch_norms_to_scale, reconstruct_blocks,
    reestimate_bn_stats, seq_mse,
)

__version__ = build_info()["version"]
__all__ = [
    "AutoQuant", "AutoQuantConfig", "AutoQuantResult",
    "AMPResult", "SensitivityResult", "amp", "analyze", "lite_mp", "set_precision",
    "AdaRoundConfig", "BiasCorrectionConfig", "BlockReconConfig", "CLEConfig", "SeqMSEConfig", "adaround",
    "correct_bias", "reconstruct_blocks", "equalize", "equalize_", "fold_batch_norms", "fold_batch_norms_",
    "fold_batch_norms_to_scale",
    "reestimate_bn_stats", "seq_mse",
    "QuantSim", "QuantSimConfig", "Quantizer", "UnsupportedModuleError", "build_info", "ops",
    "register_function", "register_module", "__version__",
]

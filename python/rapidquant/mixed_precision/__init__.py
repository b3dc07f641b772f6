"""Sensitivity analysis, LiteMP, automatic mixed precision (AMP) and manual precision."""
from rapidquant.mixed_precision.amp import AMPResult, ParetoPoint, amp
from rapidquant.mixed_precision.groups import Candidate, QuantizerGroup, find_groups, parse_candidate
from rapidquant.mixed_precision.manual import set_precision
from rapidquant.mixed_precision.sensitivity import SensitivityResult, analyze, lite_mp

__all__ = [
    "AMPResult", "Candidate", "ParetoPoint", "QuantizerGroup", "SensitivityResult", "amp", "analyze",
    "find_groups", "lite_mp", "parse_candidate", "set_precision",
]

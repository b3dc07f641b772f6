"""Pure-torch definitions of every kernel: the ground truth the tests compare against.

They follow the same fp32 operation order as the kernels, so elementwise results agree
bit for bit. They take the parameters in the full-rank layout used by the ops (see
rapidquant.ops._utils.block_spec).
"""
from rapidquant.reference.adaround import adaround_weight
from rapidquant.reference.qdq import (
    dequantize,
    drop_select,
    expand_param,
    float_quantize_dequantize,
    keeps_float,
    quantize,
    quantize_dequantize,
    quantize_dequantize_drop,
)
from rapidquant.reference.stats import histogram, minmax, range_search

__all__ = [
    "adaround_weight", "dequantize", "drop_select", "expand_param", "float_quantize_dequantize", "histogram",
    "keeps_float", "minmax", "quantize", "quantize_dequantize", "quantize_dequantize_drop", "range_search",
]

"""rapidquant's torch operators (namespace ``torch.ops.rapidquant``).

The only layer that touches ``data_ptr()``: each op has a fake (meta) implementation for
torch.compile/torch.export, CPU and CUDA kernels from ``rapidquant._C``, and autograd where
it has a backward. Pure-torch definitions live in :mod:`rapidquant.reference`.
"""
from rapidquant.ops._utils import qrange
from rapidquant.ops.adaround import adaround_weight
from rapidquant.ops.float_qdq import float_quantize_dequantize
from rapidquant.ops.qdq import (dequantize, drop_select, quantize, quantize_dequantize, quantize_dequantize_,
                                quantize_dequantize_drop)
from rapidquant.ops.stats import histogram, minmax, range_search, sqnr_candidates

__all__ = [
    "adaround_weight", "dequantize", "drop_select", "float_quantize_dequantize", "histogram", "minmax", "qrange",
    "quantize", "quantize_dequantize", "quantize_dequantize_", "quantize_dequantize_drop", "range_search",
    "sqnr_candidates",
]

"""rapidquant: a compiled quantization toolkit for PyTorch."""
import torch  # noqa: F401  # torch first: its OpenMP runtime is the one _C shares

from rapidquant._ext import build_info
from rapidquant import ops

__version__ = build_info()["version"]
__all__ = ["build_info", "ops", "__version__"]

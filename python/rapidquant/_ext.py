"""Loads the compiled extension and reports what it was built with."""
from __future__ import annotations

import torch  # noqa: F401  # load torch (and its libgomp) before _C so one OpenMP runtime is used

from rapidquant import _C

CUDA_MISSING = (
    "rapidquant was built without CUDA kernels, so {what} cannot run on a CUDA tensor. "
    "Reinstall with nvcc available (it is found on PATH, via CUDACXX, or in /usr/local/cuda) "
    "and RAPIDQUANT_ENABLE_CUDA=ON, e.g. `RAPIDQUANT_ENABLE_CUDA=ON pip install rapidquant`, "
    "or move the tensors to the CPU."
)


def build_info() -> dict:
    """What the extension was built with: CUDA, OpenMP, CUDA archs, versions."""
    return {
        "version": _C.version,
        "with_cuda": bool(_C.with_cuda),
        "with_openmp": bool(_C.with_openmp),
        "cuda_archs": list(_C.cuda_archs),
        "cuda_version": _C.cuda_version,
    }


def require_cuda(what: str) -> None:
    if not _C.with_cuda:
        raise RuntimeError(CUDA_MISSING.format(what=what))

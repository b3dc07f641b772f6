"""The rapidquant:: operator namespace and helpers to register per-device kernels."""
from __future__ import annotations

import torch

from rapidquant._ext import _C, require_cuda

LIB = torch.library.Library("rapidquant", "DEF")


def define(schema: str) -> str:
    """Define rapidquant::<schema> and return its qualified name."""
    LIB.define(schema)
    return "rapidquant::" + schema.split("(", 1)[0]


def register(name: str, cpu, cuda) -> None:
    """Register the CPU kernel and a CUDA kernel that fails clearly in CPU-only builds."""
    torch.library.register_kernel(name, "cpu", cpu, lib=LIB)

    def cuda_or_error(*args, **kwargs):
        require_cuda(name)
        return cuda(*args, **kwargs)

    torch.library.register_kernel(name, "cuda", cuda_or_error, lib=LIB)


def cfn(name: str):
    """A _C function looked up at call time (CUDA entry points exist only in CUDA builds)."""
    return getattr(_C, name)

"""The rapidquant:: operator namespace and helpers to register per-device kernels."""
from __future__ import annotations

import functools
import sys

import torch

from rapidquant._ext import _C, require_cuda

LIB = torch.library.Library("rapidquant", "DEF")


def define(schema: str) -> str:
    """Define rapidquant::<schema> and return its qualified name."""
    LIB.define(schema)
    return "rapidquant::" + schema.split("(", 1)[0]


def _dynamo_disabled(fn):
    """fn behind torch._dynamo.disable, as torch.library.register_kernel guards a Python
    kernel, but without importing dynamo in a process that has not: register_kernel's guard
    imports it on a process's first op call (about 1.1 s on this project's 2-core machine,
    bench/bench_rounding_overheads.py), paid by every run that never compiles or exports. A
    process that has not imported torch._dynamo cannot be running it, so the kernel runs as it
    is until dynamo is there."""
    guarded = None

    @functools.wraps(fn)
    def kernel(*args, **kwargs):
        nonlocal guarded
        if guarded is None:
            dynamo = sys.modules.get("torch._dynamo")
            if dynamo is None or not hasattr(dynamo, "disable"):  # absent, or too early in its import
                return fn(*args, **kwargs)
            guarded = dynamo.disable(fn, recursive=True, wrapping=False)  # what torch._disable_dynamo makes
        return guarded(*args, **kwargs)
    return kernel


def register(name: str, cpu, cuda) -> None:
    """Register the CPU kernel and a CUDA kernel that fails clearly in CPU-only builds."""
    torch.library.impl(name, "cpu", _dynamo_disabled(cpu), lib=LIB)

    def cuda_or_error(*args, **kwargs):
        require_cuda(name)
        return cuda(*args, **kwargs)

    torch.library.impl(name, "cuda", _dynamo_disabled(cuda_or_error), lib=LIB)


def cfn(name: str):
    """A _C function looked up at call time (CUDA entry points exist only in CUDA builds)."""
    return getattr(_C, name)

"""Encodings are validated on every device before a kernel runs: the CUDA branch checks in
Python exactly what the CPU kernels check (tested here without a GPU by running the CUDA
branch on CPU tensors with the kernel launch replaced by a recorder)."""
import re

import pytest
import torch

from rapidquant import ops
from rapidquant.ops import _utils as U
from rapidquant.ops import qdq

BAD = {  # (scale, zero point) -> which check fails
    "zero scale": (0.0, 0.0),
    "negative scale": (-0.1, 0.0),
    "NaN scale": (float("nan"), 0.0),
    "inf scale": (float("inf"), 0.0),
    "fractional zero point": (0.1, 0.5),
    "zero point above qmax": (0.1, 200.0),
    "zero point below qmin": (0.1, -129.0),
    "NaN zero point": (0.1, float("nan")),
}


def _message(e: Exception) -> str:
    return re.sub(r"\s*\[\w+ at .*\]$", "", str(e))  # the CPU kernel appends its source location


@pytest.mark.parametrize("case", list(BAD))
def test_python_check_says_what_the_cpu_kernel_says(case):
    s, z = BAD[case]
    scale, zp = torch.tensor([0.2, s]), torch.tensor([0.0, z])
    x = torch.randn(3, 2)
    with pytest.raises(ValueError) as cpu:
        ops.quantize_dequantize(x, scale, zp, -128, 127, axis=1)
    with pytest.raises(ValueError) as py:
        U.check_encoding(scale, zp, -128, 127)
    assert _message(py.value) == _message(cpu.value)
    assert "[1]" in str(py.value)  # names the offending channel


def test_valid_encodings_pass():
    U.check_encoding(torch.tensor([0.1, 1e-8]), torch.tensor([-128.0, 127.0]), -128, 127)
    U.check_encoding(torch.tensor(0.5))


@pytest.fixture
def launches(monkeypatch):
    """The CUDA branch of the op implementations, on CPU tensors, with launches recorded."""
    calls = []
    monkeypatch.setattr(qdq, "cfn", lambda name: (lambda *a: calls.append(name)))
    monkeypatch.setattr(U, "stream", lambda t: 0)
    return calls


@pytest.mark.parametrize("case", list(BAD))
def test_cuda_branch_validates_before_launching(launches, case):
    s, z = BAD[case]
    scale, zp = torch.tensor([[s]]), torch.tensor([[z]])
    x, block = torch.randn(2, 3), [0, 0]
    calls = [
        lambda: qdq._qdq_impl("cuda")(x, scale, zp, -128, 127, block),
        lambda: qdq._qdq_bwd_impl("cuda")(x, x, scale, zp, -128, 127, block, True, True),
        lambda: qdq._quantize_impl("cuda")(x, scale, zp, -128, 127, block, torch.int8),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="must be"):
            call()
    if "scale" in case:  # dequantize checks the scale (any zero point is a valid code offset)
        with pytest.raises(ValueError, match="must be finite"):
            qdq._dequantize_impl("cuda")(torch.zeros(2, 3, dtype=torch.int8), scale, zp, block, torch.float32)
    assert launches == []


def test_cuda_branch_launches_with_a_valid_encoding(launches):
    scale, zp, x, block = torch.tensor([[0.1]]), torch.tensor([[3.0]]), torch.randn(2, 3), [0, 0]
    qdq._qdq_impl("cuda")(x, scale, zp, -128, 127, block)
    qdq._quantize_impl("cuda")(x, scale, zp, -128, 127, block, torch.int8)
    qdq._dequantize_impl("cuda")(torch.zeros(2, 3, dtype=torch.int8), scale, zp, block, torch.float32)
    assert launches == ["qdq_cuda", "quantize_cuda", "dequantize_cuda"]


def test_quantize_raises_on_nan(device):
    """README: NaN has no integer representation, so quantize raises on every device (the
    cuda parametrization runs where a GPU is usable)."""
    x = torch.randn(8, device=device)
    x[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.quantize(x, torch.tensor(0.1, device=device), torch.tensor(0.0, device=device), -128, 127)

"""Float-format QDQ (fp16, bf16, fp8 e4m3fn/e5m2) against torch's own casts."""
import pytest
import torch

from rapidquant import ops, reference as R
from rapidquant.ops import _utils as U

FORMATS = [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


def special_values():
    # ties, subnormals of every format, the saturation edges, inf, signed zeros
    vals = [0.0, -0.0, 1.0, -1.0, 1.5, 2.5, 448.0, 449.0, 464.0, 480.0, 57344.0, 61440.0, 65504.0,
            65519.0, 65520.0, 1e6, -1e6, float("inf"), -float("inf"), 2.0 ** -6, 2.0 ** -9, 2.0 ** -10,
            3 * 2.0 ** -11, 2.0 ** -14, 2.0 ** -16, 2.0 ** -17, 3 * 2.0 ** -25, 2.0 ** -24, 2.0 ** -25,
            1e-40, -1e-40, 2.0 ** -133, 3e38, -3e38, 1.0 + 2.0 ** -8, 1.0 + 2.0 ** -4 + 2.0 ** -5]
    return torch.tensor(vals + [-v for v in vals], dtype=torch.float32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_torch_cast_bitexact(device, fmt):
    x = torch.cat([torch.randn(50000) * 100, torch.randn(5000) * 1e-3, special_values()]).to(device)
    y = ops.float_quantize_dequantize(x, fmt)
    ref = R.float_quantize_dequantize(x.cpu(), fmt).to(device)
    assert torch.equal(y, ref)
    assert torch.equal(torch.signbit(y), torch.signbit(ref))  # signed zeros kept


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(device, fmt, dtype):
    x = (torch.randn(4096) * 30).to(dtype).to(device)
    assert torch.equal(ops.float_quantize_dequantize(x, fmt), R.float_quantize_dequantize(x, fmt))


def test_nan_propagates_and_saturation():
    x = torch.tensor([float("nan"), 1e9, -1e9])
    y = ops.float_quantize_dequantize(x, torch.float8_e4m3fn)
    assert torch.isnan(y[0]) and y[1] == 448 and y[2] == -448
    assert ops.float_quantize_dequantize(torch.tensor([1e9]), torch.float16).item() == 65504


@pytest.mark.parametrize("fmt", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_per_tensor_and_per_channel_scale(device, fmt):
    x = torch.randn(16, 32, device=device) * torch.logspace(-3, 3, 32, device=device)
    s = x.abs().amax(0) / 448
    y = ops.float_quantize_dequantize(x, fmt, scale=s, axis=1)
    spec = U.block_spec(x.shape, 1, None)
    assert torch.equal(y, R.float_quantize_dequantize(x, fmt, s.reshape(1, -1), spec))
    st = torch.tensor(0.37, device=device)
    assert torch.equal(ops.float_quantize_dequantize(x, fmt, scale=st),
                       R.float_quantize_dequantize(x, fmt, st.reshape(1, 1), [0, 0]))
    # a per-channel scale keeps relative error small on every channel
    rel = ((y - x).abs().amax(0) / x.abs().amax(0))
    assert rel.max() < 0.13


def test_gradient_straight_through_with_saturation():
    x = torch.tensor([1.0, 500.0, -3.0, -1000.0], requires_grad=True)
    ops.float_quantize_dequantize(x, torch.float8_e4m3fn).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_opcheck_and_bad_input():
    x = torch.randn(5, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.rapidquant.float_quantize_dequantize.default, (x, None, 2, [0, 0]))
    torch.library.opcheck(torch.ops.rapidquant.float_quantize_dequantize.default, (x, torch.rand(1, 4) + 0.1, 3, [0, 1]))
    with pytest.raises(ValueError, match="dtype must be one of"):
        ops.float_quantize_dequantize(x, torch.int8)
    with pytest.raises(ValueError, match="must be finite and > 0"):
        ops.float_quantize_dequantize(x, torch.float16, scale=torch.tensor(0.0))

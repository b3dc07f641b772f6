"""Affine QDQ / quantize / dequantize kernels against the pure-torch reference."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from rapidquant import ops, reference as R
from rapidquant.ops import _utils as U

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def ref_qdq(x, scale, zp, qmin, qmax, axis=None, block_size=None):
    spec = U.block_spec(x.shape, axis, block_size)
    ps = U.param_shape(x.shape, spec)
    return R.quantize_dequantize(x, scale.reshape(ps), zp.reshape(ps), qmin, qmax, spec)


def assert_bitexact(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b)
    assert torch.equal(a[~nan_a], b[~nan_b]), f"max diff {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (4, False), (8, True), (8, False), (16, True), (16, False)])
def test_per_tensor_bitexact(device, dtype, bits, signed):
    qmin, qmax = ops.qrange(bits, signed)
    x = (torch.randn(70001) * 3).to(dtype).to(device)  # above the OpenMP grain
    scale = torch.tensor(6.0 / (qmax - qmin), device=device)
    zp = torch.tensor(float((qmin + qmax) // 2 + 1), device=device)
    assert_bitexact(ops.quantize_dequantize(x, scale, zp, qmin, qmax), ref_qdq(x, scale, zp, qmin, qmax))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((16, 8, 3, 3), 0), ((16, 8, 3, 3), 1), ((4, 6, 5, 7), 2),
                                        ((4, 6, 5, 7), 3), ((4, 6, 5, 7), -1), ((33, 65), 1), ((9,), 0)])
def test_per_channel_all_axes(device, dtype, shape, axis):
    x = torch.randn(shape).to(dtype).to(device)
    C = shape[axis]
    scale = (torch.rand(C) * 0.1 + 1e-3).to(device)
    zp = torch.randint(-20, 20, (C,)).float().to(device)
    assert_bitexact(ops.quantize_dequantize(x, scale, zp, -128, 127, axis=axis),
                    ref_qdq(x, scale, zp, -128, 127, axis=axis))


@pytest.mark.parametrize("shape,block,axis", [((8, 64), 16, 0), ((8, 64), 16, None), ((6, 32, 3, 3), 8, 0),
                                              ((12, 8, 3), (4, 2, -1), None), ((12, 8, 3), (-1, 4, 3), None)])
def test_per_block(device, shape, block, axis):
    x = torch.randn(shape, device=device)
    spec = U.block_spec(shape, axis, block)
    ps = U.param_shape(shape, spec)
    scale = (torch.rand(ps) * 0.05 + 1e-3).to(device)
    zp = torch.randint(-3, 3, ps).float().to(device)
    y = ops.quantize_dequantize(x, scale, zp, -8, 7, axis=axis, block_size=block)
    assert_bitexact(y, ref_qdq(x, scale, zp, -8, 7, axis=axis, block_size=block))
    # every block really has its own scale: compare with a per-block loop
    if isinstance(block, int):
        b = block
        xs = x.reshape(shape[0], shape[1] // b, b, -1)
        for c in range(shape[0]):
            for j in range(shape[1] // b):
                s, zz = scale.reshape(shape[0], -1)[c, j], zp.reshape(shape[0], -1)[c, j]  # int block_size: per channel on axis 0
                blk = ops.quantize_dequantize(xs[c, j].contiguous(), s, zz, -8, 7)
                assert torch.equal(y.reshape(xs.shape)[c, j], blk)


def test_block_scale_accepts_2d_shape():
    x = torch.randn(8, 64)
    scale = torch.rand(8, 4) + 0.01
    y = ops.quantize_dequantize(x, scale, torch.zeros(8, 4), -8, 7, axis=0, block_size=16)
    assert_bitexact(y, ref_qdq(x, scale, torch.zeros(8, 4), -8, 7, axis=0, block_size=16))


def test_exact_ties_round_half_even(device):
    scale = torch.tensor(0.5, device=device)
    x = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, 1.75, 63.25, -64.25], device=device)  # x/s = k + .5
    y = ops.quantize_dequantize(x, scale, torch.tensor(0.0, device=device), -128, 127)
    expected = torch.tensor([0.0, 1.0, 1.0, -0.0, -1.0, 2.0, 63.0, -64.0], device=device)
    assert torch.equal(y, expected)
    assert_bitexact(y, ref_qdq(x, scale, torch.tensor(0.0, device=device), -128, 127))


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e-4, 1.0, 1e4, 1e20, 3e38])
def test_huge_and_tiny_scales(device, scale):
    x = torch.cat([torch.randn(1000) * scale * 50, torch.tensor([float("inf"), -float("inf"), 3e38, -3e38, 0.0])]).to(device)
    s = torch.tensor(scale, device=device)
    for zp in (-128.0, 0.0, 127.0):  # zero point at both range ends
        z = torch.tensor(zp, device=device)
        assert_bitexact(ops.quantize_dequantize(x, s, z, -128, 127), ref_qdq(x, s, z, -128, 127))


def test_inf_saturates_and_nan_propagates(device):
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), 1.0], device=device)
    y = ops.quantize_dequantize(x, torch.tensor(0.1, device=device), torch.tensor(0.0, device=device), -128, 127)
    assert y[0].item() == pytest.approx(12.7) and y[1].item() == pytest.approx(-12.8)
    assert math.isnan(y[2].item()) and y[3].item() == pytest.approx(1.0)


def test_explicit_qrange_and_noncontiguous(device):
    x = torch.randn(64, 48, device=device).t()[:, ::2]  # transposed + strided
    assert not x.is_contiguous()
    s, z = torch.rand(x.shape[1], device=device) * 0.1 + 0.01, torch.zeros(x.shape[1], device=device)
    y = ops.quantize_dequantize(x, s, z, -100, 37, axis=1)
    assert_bitexact(y, ref_qdq(x, s, z, -100, 37, axis=1))
    x_off = torch.randn(1000, device=device)[1:]  # offset storage
    s1, z1 = torch.tensor(0.02, device=device), torch.tensor(5.0, device=device)
    assert_bitexact(ops.quantize_dequantize(x_off, s1, z1, 0, 255), ref_qdq(x_off, s1, z1, 0, 255))


def test_empty_and_scalar(device):
    s, z = torch.tensor(0.1, device=device), torch.tensor(0.0, device=device)
    e = torch.empty(0, 5, device=device)
    assert ops.quantize_dequantize(e, s, z, -128, 127).shape == (0, 5)
    assert ops.quantize_dequantize(torch.empty(0, 5, device=device), torch.ones(5, device=device), torch.zeros(5, device=device), -8, 7, axis=1).shape == (0, 5)
    x = torch.tensor(0.33, device=device)
    assert_bitexact(ops.quantize_dequantize(x, s, z, -128, 127), ref_qdq(x, s, z, -128, 127))


@settings(max_examples=150, deadline=None, derandomize=True)  # same examples every run
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    bits=st.integers(2, 16),
    signed=st.booleans(),
    log_scale=st.floats(-12, 6),
    zp_frac=st.floats(0, 1),
    per_channel=st.booleans(),
    axis_seed=st.integers(0, 10),
    dtype=st.sampled_from(DTYPES),
)
def test_property_matches_reference(shape, bits, signed, log_scale, zp_frac, per_channel, axis_seed, dtype):
    qmin, qmax = ops.qrange(bits, signed)
    x = (torch.randn(shape) * (2.0 ** log_scale) * (qmax - qmin) / 3).to(dtype)
    axis = axis_seed % len(shape) if per_channel else None
    C = shape[axis] if per_channel else 1
    scale = torch.full((C,), 2.0 ** log_scale) * (torch.rand(C) + 0.5)
    zp = torch.round(qmin + zp_frac * (qmax - qmin) * torch.rand(C))
    if not per_channel:
        scale, zp = scale[0], zp[0]
    y = ops.quantize_dequantize(x, scale, zp, qmin, qmax, axis=axis)
    assert_bitexact(y, ref_qdq(x, scale, zp, qmin, qmax, axis=axis))
    # properties: on the grid, inside the range, and idempotent
    s = scale if axis is None else scale.reshape([-1 if d == axis else 1 for d in range(len(shape))])
    z = zp if axis is None else zp.reshape(s.shape)
    q = y.float() / s + z
    if dtype == torch.float32:
        tol = 1e-3 + 1e-6 * (qmax - qmin)  # y / s + z is itself rounded
        assert torch.all(q >= qmin - tol) and torch.all(q <= qmax + tol)
        assert torch.equal(ops.quantize_dequantize(y, scale, zp, qmin, qmax, axis=axis), y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_roundtrip(device, dtype):
    x = torch.randn(37, 19).to(dtype).to(device)
    for qmin, qmax, want in ((-128, 127, torch.int8), (0, 255, torch.uint8), (-32768, 32767, torch.int16), (0, 65535, torch.int32)):
        s = torch.rand(19, device=device) * 0.05 + 0.001
        z = torch.round(torch.rand(19, device=device) * (qmax - qmin) + qmin)
        q = ops.quantize(x, s, z, qmin, qmax, axis=1)
        assert q.dtype == want
        spec = U.block_spec(x.shape, 1, None)
        assert torch.equal(q, R.quantize(x, s.reshape(1, -1), z.reshape(1, -1), qmin, qmax, spec, want))
        y = ops.dequantize(q, s, z, axis=1, dtype=dtype)
        assert_bitexact(y, ops.quantize_dequantize(x, s, z, qmin, qmax, axis=1))


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_backward_matches_reference_autograd(device, axis):
    x = (torch.randn(40, 30, device=device) * 2).requires_grad_()
    C = 1 if axis is None else x.shape[axis]
    scale = (torch.rand(C, device=device) * 0.02 + 0.01).requires_grad_()
    zp = torch.randint(-10, 10, (C,), device=device).float().requires_grad_()
    s_in, z_in = (scale[0], zp[0]) if axis is None else (scale, zp)
    g = torch.randn(40, 30, device=device)
    y = ops.quantize_dequantize(x, s_in, z_in, -128, 127, axis=axis)
    dx, ds, dz = torch.autograd.grad(y, (x, scale, zp), g)
    y2 = ref_qdq(x, s_in, z_in, -128, 127, axis=axis)
    rx, rs, rz = torch.autograd.grad(y2, (x, scale, zp), g)
    assert torch.equal(dx == 0, rx == 0)  # the straight-through mask is exact
    torch.testing.assert_close(dx, rx, rtol=1e-6, atol=0)  # autograd computes (g * s) / s
    torch.testing.assert_close(ds, rs, rtol=1e-4, atol=1e-5)  # sums reordered
    torch.testing.assert_close(dz, rz, rtol=1e-4, atol=1e-5)
    # some elements clip, so the outside branches are exercised
    assert (dx == 0).any() and (dx != 0).any()


@pytest.mark.parametrize("axis", [None, 1])
def test_eager_cpu_autograd_path_matches_the_op(axis):
    """On plain CPU tensors with autograd, quantize_dequantize skips the dispatcher (a custom
    autograd.Function over the same kernels); it must give the op's outputs and gradients
    bit for bit."""
    torch.manual_seed(0)
    x0 = torch.randn(64, 48) * 2
    C = 1 if axis is None else 48
    s0, z0 = torch.rand(C) * 0.02 + 0.01, torch.randint(-10, 10, (C,)).float()
    g = torch.randn(64, 48)
    outs = []
    for eager in (True, False):
        x, s, z = (t.clone().requires_grad_() for t in (x0, s0, z0))
        if eager:
            y = ops.quantize_dequantize(x, s, z, -128, 127, axis=axis)
            assert type(y.grad_fn).__name__ == "_EagerQDQBackward"
        else:
            spec = U.block_spec(x.shape, axis, None)
            ps = U.param_shape(x.shape, spec)
            y = torch.ops.rapidquant.quantize_dequantize(x, s.reshape(ps), z.reshape(ps), -128, 127, spec)
        outs.append((y,) + torch.autograd.grad(y, (x, s, z), g))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert (outs[0][1] == 0).any() and outs[0][2].abs().sum() > 0  # clipped elements, a scale gradient


def test_lsq_scale_gradient_against_central_differences():
    # Between rounding jumps, f(s) = sum(w * s * clamp(round(x / s))) has the exact derivative
    # sum(w * clamp(round(x / s))), which central differences measure in float64 with a step
    # that moves no element across a rounding boundary. LSQ's gradient is that derivative
    # minus the straight-through term sum_inside(w * x / s) (round() treated as identity).
    torch.manual_seed(1)
    x = torch.randn(2000, dtype=torch.float32) * 0.5
    s = torch.tensor(0.02, requires_grad=True)
    w = torch.randn(2000)
    (ops.quantize_dequantize(x, s, torch.tensor(0.0), -16, 15) * w).sum().backward()
    s0, h = float(s.detach()), 1e-7
    x64, w64 = x.double(), w.double()

    def f(sv):
        return (w64 * torch.clamp(torch.round(x64 / sv), -16, 15) * sv).sum().item()

    assert torch.equal(torch.round(x64 / (s0 + h)), torch.round(x64 / (s0 - h)))  # no jump inside the step
    fd = (f(s0 + h) - f(s0 - h)) / (2 * h)
    v = x64 / s0
    inside = (torch.round(v) >= -16) & (torch.round(v) <= 15)
    lsq = fd - (w64 * v * inside).sum().item()
    # measured relative difference 1.8e-6 (fp32 kernel sums vs float64); margin 10x
    assert s.grad.item() == pytest.approx(lsq, rel=2e-5)
    assert abs(lsq) > 1.0  # non-trivial value (18.4 measured)


def test_gradcheck_in_float64_reference_agrees_with_kernel_grad():
    # the kernel is fp32 only; check it against the reference's float64 autograd
    x = torch.randn(50, 8, dtype=torch.float64) * 0.3
    s = torch.rand(8, dtype=torch.float64) * 0.01 + 0.01
    z = torch.zeros(8, dtype=torch.float64)
    xs, ss = x.float().requires_grad_(), s.float().requires_grad_()
    y = ops.quantize_dequantize(xs, ss, z.float(), -8, 7, axis=1)
    gy = torch.randn_like(y)
    _, ds = torch.autograd.grad(y, (xs, ss), gy)
    x64, s64 = x.clone().requires_grad_(), s.clone().requires_grad_()
    spec = U.block_spec(x.shape, 1, None)
    y64 = R.quantize_dequantize(x64, s64.reshape(1, 8), z.reshape(1, 8), -8, 7, spec)
    _, rs = torch.autograd.grad(y64, (x64, s64), gy.double())
    torch.testing.assert_close(ds.double(), rs, rtol=1e-3, atol=1e-4)


def test_backward_only_x_needed(device):
    x = torch.randn(100, device=device, requires_grad=True)
    y = ops.quantize_dequantize(x, torch.tensor(0.01, device=device), torch.tensor(0.0, device=device), -128, 127)
    y.sum().backward()
    assert torch.equal(x.grad, ((x.detach() / 0.01).round().abs() <= 127).float() * ((x.detach() / 0.01).round() >= -128).float())


# ------------------------------------------------------------------ op contract
def test_opcheck(device):
    x = torch.randn(6, 5, device=device, requires_grad=True)
    s = torch.rand(1, 5, device=device).add(0.01).requires_grad_()
    z = torch.zeros(1, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.rapidquant.quantize_dequantize.default, (x, s, z, -8, 7, [0, 1]))
    xt = torch.randn(5, 6, device=device).t().requires_grad_()
    torch.library.opcheck(torch.ops.rapidquant.quantize_dequantize.default, (xt, s, z, -8, 7, [0, 1]))
    torch.library.opcheck(torch.ops.rapidquant.quantize.default, (x.detach(), s.detach(), z.detach(), -8, 7, [0, 1], torch.int8))
    q = torch.randint(-8, 8, (6, 5), dtype=torch.int8, device=device)
    torch.library.opcheck(torch.ops.rapidquant.dequantize.default, (q, s.detach(), z.detach(), [0, 1], torch.float32))


@pytest.mark.compile
def test_torch_compile_fullgraph_and_export():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.full((8,), 0.05))
            self.register_buffer("zp", torch.zeros(8))

        def forward(self, x):
            return ops.quantize_dequantize(x, self.scale, self.zp, -128, 127, axis=1) * 2

    m = M()
    x = torch.randn(4, 8)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), eager)
    ep = torch.export.export(m, (x,))
    assert torch.equal(ep.module()(x), eager)
    assert any("rapidquant.quantize_dequantize" in str(n.target) for n in ep.graph.nodes)


def test_op_calls_import_dynamo_only_when_it_is_there():
    """The kernels do not import torch._dynamo (about 1.1 s, once per process) in a process
    that never compiles or exports; once dynamo is imported, they run behind
    torch._dynamo.disable as torch.library.register_kernel would put them."""
    import subprocess
    import sys
    code = """
import sys, torch, rapidquant
x, s, z = torch.randn(4, 8), torch.tensor([0.05]), torch.tensor([0.0])
torch.ops.rapidquant.quantize_dequantize(x, s, z, -128, 127, [0, 0])
torch.ops.rapidquant.minmax(x, [0, 0])
assert "torch._dynamo" not in sys.modules, "an op call imported torch._dynamo"
import torch._dynamo
guarded = []
real = torch._dynamo.disable
def recording(fn=None, recursive=True, **kw):
    guarded.append(fn.__name__)
    return real(fn, recursive, **kw)
torch._dynamo.disable = recording
y = torch.ops.rapidquant.quantize_dequantize(x, s, z, -128, 127, [0, 0])
assert guarded == ["impl"], guarded  # the CPU kernel of ops/qdq.py
assert torch.equal(y, torch.ops.rapidquant.quantize_dequantize(x, s, z, -128, 127, [0, 0]))
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(scale=0.0), ValueError, "must be finite and > 0"),
    (dict(scale=-1.0), ValueError, "must be finite and > 0"),
    (dict(scale=float("nan")), ValueError, "must be finite and > 0"),
    (dict(zp=200.0), ValueError, r"zero_point\[0\] = 200 must be an integer in \[qmin, qmax\]"),
    (dict(zp=0.5), ValueError, "must be an integer"),
    (dict(qmin=5, qmax=5), ValueError, "qmin .* must be smaller than qmax"),
    (dict(qmin=0, qmax=1 << 30), ValueError, "outside the supported integer range"),
])
def test_bad_encodings_raise_clear_errors(kwargs, exc, msg):
    args = dict(scale=0.1, zp=0.0, qmin=-128, qmax=127) | kwargs
    with pytest.raises(exc, match=msg):
        ops.quantize_dequantize(torch.randn(10), torch.tensor(args["scale"]), torch.tensor(args["zp"]), args["qmin"], args["qmax"])


def test_bad_shapes_axes_dtypes():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"scale has shape \(5,\) but x of shape \(4, 6\)"):
        ops.quantize_dequantize(x, torch.ones(5), torch.zeros(5), -8, 7, axis=1)
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        ops.quantize_dequantize(x, torch.ones(6), torch.zeros(6), -8, 7, axis=2)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.quantize_dequantize(x.double(), torch.tensor(1.0), torch.tensor(0.0), -8, 7)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ops.quantize_dequantize(torch.ones(3, dtype=torch.int32), torch.tensor(1.0), torch.tensor(0.0), -8, 7)
    with pytest.raises(ValueError, match="block size 4 does not divide dim 1 of size 6"):
        ops.quantize_dequantize(x, torch.ones(4, 1), torch.zeros(4, 1), -8, 7, block_size=4, axis=0)
    with pytest.raises(ValueError, match="x contains NaN"):
        ops.quantize(torch.tensor([float("nan")]), torch.tensor(1.0), torch.tensor(0.0), -8, 7)
    with pytest.raises(TypeError, match="q must be an int8"):
        ops.dequantize(torch.randn(3), torch.tensor(1.0), torch.tensor(0.0))


def test_scale_on_wrong_device_is_reported():
    x = torch.randn(4, device="meta")
    with pytest.raises(ValueError, match="scale is on cpu but x is on meta"):
        ops.quantize_dequantize(x, torch.tensor(1.0), torch.tensor(0.0), -8, 7)


def test_inplace_variant_matches_and_reuses_storage(device):
    x = torch.randn(64, 33, device=device)
    s, z = torch.rand(33, device=device) * 0.05 + 0.01, torch.zeros(33, device=device)
    want = ops.quantize_dequantize(x, s, z, -128, 127, axis=1)
    ptr = x.data_ptr()
    got = ops.quantize_dequantize_(x, s, z, -128, 127, axis=1)
    assert got.data_ptr() == ptr and torch.equal(got, want)
    xt = torch.randn(33, 64, device=device).t()  # non-contiguous: falls back to out of place
    assert torch.equal(ops.quantize_dequantize_(xt, s, z, -128, 127, axis=1),
                       ops.quantize_dequantize(xt, s, z, -128, 127, axis=1))


# ------------------------------------------------------------------ QDrop
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("axis", [None, 1])
def test_drop_matches_reference_forward_and_backward(device, dtype, axis):
    """Kernel vs reference (hash computed in numpy): forward bit-exact, the same elements
    kept float, dx exact, scale/zero-point gradients from the quantized elements only."""
    torch.manual_seed(0)
    x = (torch.randn(64, 33, 5, device=device) * 2).to(dtype).requires_grad_()
    C = 1 if axis is None else x.shape[1]
    scale = (torch.rand(C, device=device) * 0.05 + 0.02).requires_grad_()
    zp = torch.randint(-3, 3, (C,), device=device).float().requires_grad_()
    s_in, z_in = (scale[0], zp[0]) if axis is None else (scale, zp)
    # p = 0.3: with 0.5 only the hash's top bit decides, which hides most hash errors
    y = ops.quantize_dequantize_drop(x, s_in, z_in, -8, 7, 0.3, seed=1234, axis=axis)
    spec = U.block_spec(x.shape, axis, None)
    ps = U.param_shape(x.shape, spec)
    yr = R.quantize_dequantize_drop(x, s_in.reshape(ps), z_in.reshape(ps), -8, 7, spec, 1234,
                                    ops.qdq.drop_threshold(0.3))
    assert_bitexact(y, yr)
    keep = R.keeps_float(x.numel(), 1234, ops.qdq.drop_threshold(0.3)).reshape(x.shape).to(device)
    assert abs(keep.float().mean().item() - 0.3) < 0.025  # 10560 draws: sigma 0.0045
    assert torch.equal(y[keep], x[keep]) and not torch.equal(y[~keep], x[~keep])
    g = torch.randn_like(y)
    dx, ds, dz = torch.autograd.grad(y, (x, scale, zp), g)
    rx, rs, rz = torch.autograd.grad(yr, (x, scale, zp), g)
    assert torch.equal(dx == 0, rx == 0) and torch.equal(dx[keep], g[keep])  # the mask is exact
    torch.testing.assert_close(dx, rx, rtol=1e-6, atol=0)  # autograd computes (g * s) / s
    torch.testing.assert_close(ds, rs, rtol=1e-3, atol=1e-4)  # sums reordered (fp16 inputs: rtol 1e-3)
    torch.testing.assert_close(dz, rz, rtol=1e-3, atol=1e-4)


def test_drop_edges_and_thread_independence():
    x, s, z = torch.randn(1000, 37), torch.tensor(0.05), torch.tensor(0.0)
    plain = ops.quantize_dequantize(x, s, z, -8, 7)
    assert torch.equal(ops.quantize_dequantize_drop(x, s, z, -8, 7, 0.0, seed=5), plain)
    assert (ops.quantize_dequantize_drop(x, s, z, -8, 7, 1.0, seed=5) == x).float().mean() > 0.999999
    a = ops.quantize_dequantize_drop(x, s, z, -8, 7, 0.3, seed=5)
    b = ops.quantize_dequantize_drop(x, s, z, -8, 7, 0.3, seed=6)
    assert not torch.equal(a, b)  # a new seed, a new choice
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.quantize_dequantize_drop(x, s, z, -8, 7, 0.3, seed=5)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, one)
    kept = (a == x) & (plain != x)
    assert abs(kept.float().sum().item() / (plain != x).float().sum().item() - 0.3) < 0.01
    with pytest.raises(ValueError, match="drop probability"):
        ops.quantize_dequantize_drop(x, s, z, -8, 7, 1.5, seed=5)
    with pytest.raises(ValueError, match="seed"):
        ops.quantize_dequantize_drop(x, s, z, -8, 7, 0.5, seed=-1)


def test_drop_opcheck(device):
    x = torch.randn(6, 5, device=device, requires_grad=True)
    s = torch.rand(1, 5, device=device).add(0.01).requires_grad_()
    z = torch.zeros(1, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.rapidquant.quantize_dequantize_drop.default,
                          (x, s, z, -8, 7, [0, 1], 77, 2 ** 31))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_select_matches_reference(device, dtype):
    a = torch.randn(300, 17, device=device).to(dtype)
    b = torch.randn(300, 17, device=device).to(dtype)
    out = ops.drop_select(a, b, 0.3, seed=99)
    thr = ops.qdq.drop_threshold(0.3)
    assert torch.equal(out, R.drop_select(a, b, 99, thr))
    # the same choice as the fused quantize-dequantize makes for the same seed
    kept = R.keeps_float(a.numel(), 99, thr).reshape(a.shape).to(device)
    assert torch.equal(out == b, kept | (a == b)) and 0.27 < kept.float().mean().item() < 0.33
    with pytest.raises(ValueError, match="one shape"):
        ops.drop_select(a, b[:10], 0.3, seed=1)

"""Every CPU instruction-set variant of the kernels gives the same bits as the baseline."""
import pytest
import torch

from rapidquant import _C, ops, reference as R
from rapidquant.ops import _utils as U


def available_isas():
    out = []
    before = _C.cpu_isa()
    for name in ("base", "avx2", "avx512"):
        try:
            _C.set_cpu_isa(name)
            out.append(name)
        except ValueError:
            pass
    _C.set_cpu_isa(before)
    return out


def run_all():
    torch.manual_seed(0)
    x = torch.randn(3, 40, 1000) * 3
    w = torch.randn(64, 16, 3, 3) * 0.1
    res = {}
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dt)
        res[f"qdq_{dt}"] = ops.quantize_dequantize(xd, torch.tensor(0.02), torch.tensor(3.0), -128, 127)
        res[f"qdq_c_{dt}"] = ops.quantize_dequantize(xd, torch.rand(40) * 0.05 + 0.01, torch.zeros(40), -8, 7, axis=1)
        res[f"fq_{dt}"] = ops.float_quantize_dequantize(xd, torch.float8_e4m3fn, scale=torch.tensor(0.01))
        res[f"mm_{dt}"] = torch.stack(ops.minmax(xd, axis=1))
    xg = x.clone().requires_grad_()
    s = torch.tensor(0.02, requires_grad=True)
    ops.quantize_dequantize(xg, s, torch.tensor(0.0), -128, 127).sum().backward()
    res["dx"], res["ds"] = xg.grad, s.grad
    mn, mx = ops.minmax(w, axis=0)
    res["hist"] = ops.histogram(w, 128, mn, mx, axis=0)
    res["hist_t"] = ops.histogram(x, 2048, -5.0, 5.0, clamp=True)
    sc, zp = ops.sqnr_candidates(mn, mx, 0, 255, symmetric=False)
    res["search"] = torch.stack(ops.range_search(res["hist"], mn, mx, sc, zp, 0, 255, 3.0, product=True))
    v = torch.randn_like(w, requires_grad=True)
    out, reg = ops.adaround_weight(w, v, mx.abs() / 7 + 1e-3, torch.zeros(64), -8, 7, axis=0, beta=4.0)
    (out.sum() + reg).backward()
    res["ada"], res["reg"], res["dv"] = out, reg, v.grad
    res["ada_hard"] = ops.adaround_weight(w, v.detach(), mx.abs() / 7 + 1e-3, torch.zeros(64), -8, 7, axis=0, hard=True)[0]
    return res


@pytest.mark.parametrize("isa", [i for i in available_isas() if i != "base"])  # base is the baseline
def test_isa_variants_agree(isa):
    before = _C.cpu_isa()
    try:
        _C.set_cpu_isa("base")
        base = run_all()
        _C.set_cpu_isa(isa)
        got = run_all()
    finally:
        _C.set_cpu_isa(before)
    for k in base:
        if k in ("ds", "reg", "search", "ada", "dv"):
            # reductions / transcendental polynomials: same math, possibly different lanes
            torch.testing.assert_close(got[k], base[k], rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(got[k], base[k]), k


def test_unknown_isa_is_a_clear_error():
    with pytest.raises(ValueError, match="use base, avx2 or avx512"):
        _C.set_cpu_isa("sse9")


def test_base_isa_matches_reference():
    """The baseline itself against the pure-torch reference (the other variants are
    compared with it above), bit-exact for the elementwise kernels."""
    torch.manual_seed(0)
    x = torch.randn(3, 40, 1000) * 3
    scale_c, zp_c = torch.rand(40) * 0.05 + 0.01, torch.randint(-3, 4, (40,)).float()
    spec_t, spec_c = U.block_spec(x.shape, None, None), U.block_spec(x.shape, 1, None)
    before = _C.cpu_isa()
    try:
        _C.set_cpu_isa("base")
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            xd = x.to(dt)
            got = ops.quantize_dequantize(xd, torch.tensor(0.02), torch.tensor(3.0), -128, 127)
            want = R.quantize_dequantize(xd, torch.tensor(0.02), torch.tensor(3.0), -128, 127, spec_t)
            assert torch.equal(got, want), dt
            got = ops.quantize_dequantize(xd, scale_c, zp_c, -8, 7, axis=1)
            want = R.quantize_dequantize(xd, scale_c.reshape(1, -1, 1), zp_c.reshape(1, -1, 1), -8, 7, spec_c)
            assert torch.equal(got, want), dt
            got = ops.float_quantize_dequantize(xd, torch.float8_e4m3fn, scale=torch.tensor(0.01))
            assert torch.equal(got, R.float_quantize_dequantize(xd, torch.float8_e4m3fn, torch.tensor(0.01), spec_t)), dt
            mn, mx = ops.minmax(xd, axis=1)
            assert torch.equal(mn, xd.float().amin((0, 2))) and torch.equal(mx, xd.float().amax((0, 2))), dt
    finally:
        _C.set_cpu_isa(before)

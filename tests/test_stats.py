"""Statistics kernels: min/max, histograms, the fused range search."""
import pytest
import torch

from rapidquant import ops, reference as R
from rapidquant.ops import _utils as U


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,axis", [((200001,), None), ((64, 3, 3, 3), 0), ((8, 16, 30, 30), 1), ((500, 77), 1), ((7, 5, 3), 2)])
def test_minmax_matches_reference_exactly(device, dtype, shape, axis):
    x = (torch.randn(shape) * 5).to(dtype).to(device)
    mn, mx = ops.minmax(x, axis=axis)
    if axis is None:
        assert torch.equal(mn, x.float().min()) and torch.equal(mx, x.float().max())
    else:
        dims = [d for d in range(len(shape)) if d != axis]
        assert torch.equal(mn, x.float().amin(dims)) and torch.equal(mx, x.float().amax(dims))


def test_minmax_per_block_and_nan(device):
    x = torch.randn(8, 64, device=device)
    mn, mx = ops.minmax(x, axis=0, block_size=16)
    assert mn.shape == (8, 4)
    assert torch.equal(mn, x.reshape(8, 4, 16).amin(-1)) and torch.equal(mx, x.reshape(8, 4, 16).amax(-1))
    x[3, 5] = float("nan")
    mn, mx = ops.minmax(x, axis=0)
    assert torch.isnan(mn[3]) and torch.isnan(mx[3]) and not torch.isnan(mn[:3]).any()
    x[0, 0] = float("inf")
    assert ops.minmax(x, axis=0)[1][0] == float("inf")


def test_minmax_ref_module(device):
    x = torch.randn(6, 10, device=device)
    spec = U.block_spec(x.shape, 0, 5)
    a, b = R.minmax(x, spec)
    c, d = ops.minmax(x, axis=0, block_size=5)
    assert torch.equal(a, c) and torch.equal(b, d)


@pytest.mark.parametrize("bins", [1, 7, 128, 2048])
@pytest.mark.parametrize("clamp", [False, True])
def test_histogram_per_tensor_bitexact(device, bins, clamp):
    x = torch.cat([torch.randn(100003) * 2, torch.tensor([-3.0, 3.0, float("nan"), 10.0, -10.0])]).to(device)
    h = ops.histogram(x, bins, -3.0, 3.0, clamp=clamp)
    ref = R.histogram(x.cpu(), torch.tensor([-3.0]), torch.tensor([3.0]), bins, [0], clamp).reshape(-1)
    assert torch.equal(h.cpu(), ref)
    if not clamp:
        # agrees with torch.histc up to the bin-edge rounding convention
        hc = torch.histc(x.cpu()[~torch.isnan(x.cpu())], bins, -3, 3)
        assert (h.cpu().float() - hc).abs().sum() <= max(2, bins // 64)
    assert h.sum() == (x.numel() - 1 if clamp else ((x >= -3) & (x <= 3)).sum())


@pytest.mark.parametrize("shape,axis", [((64, 3, 3, 3), 0), ((4, 32, 10, 10), 1), ((300, 24), 1)])
def test_histogram_per_channel_ranges(device, shape, axis):
    x = torch.randn(shape, device=device) * torch.arange(1, shape[axis] + 1, device=device).reshape(
        [-1 if d == axis else 1 for d in range(len(shape))])
    mn, mx = ops.minmax(x, axis=axis)
    h = ops.histogram(x, 512, mn, mx, axis=axis)
    assert h.shape == (shape[axis], 512)
    spec = U.block_spec(shape, axis, None)
    ps = U.param_shape(shape, spec)
    ref = R.histogram(x.cpu(), mn.cpu().reshape(ps), mx.cpu().reshape(ps), 512, spec)
    assert torch.equal(h.cpu(), ref)
    assert torch.all(h.sum(1) == x.numel() // shape[axis])  # every value lands in its channel


def test_histogram_bad_ranges():
    with pytest.raises(ValueError, match="must be finite with hi > lo"):
        ops.histogram(torch.randn(10), 8, 1.0, 1.0)
    with pytest.raises(ValueError, match="bins must be a positive integer"):
        ops.histogram(torch.randn(10), 0, 0.0, 1.0)


def _brute_force_mse(hist, lo, hi, s, z, qmin, qmax, gamma):
    B = hist.numel()
    w = (hi - lo) / B
    tot_e, tot_c, n = 0.0, 0.0, float(hist.sum())
    for b in range(B):
        if hist[b] == 0:
            continue
        mid = lo + (b + 0.5) * w
        q = ops.quantize_dequantize(torch.tensor([mid]), torch.tensor(s), torch.tensor(z), qmin, qmax)
        r = round(mid / s)
        e2 = float(hist[b]) * (float(q) - mid) ** 2
        tot_e += e2
        tot_c += e2 * (gamma if (r + z < qmin or r + z > qmax) else 1.0)
    return tot_e / n, tot_c / n


@pytest.mark.parametrize("product", [False, True])
def test_range_search_matches_reference(device, product):
    C, B = 5, 256
    x = torch.randn(C, 4000, device=device) * torch.rand(C, 1, device=device) * 3
    mn, mx = ops.minmax(x, axis=0)
    hist = ops.histogram(x, B, mn, mx, axis=0)
    scale, zp = ops.sqnr_candidates(mn.cpu(), mx.cpu(), 0, 255, symmetric=False)
    if not product:
        scale, zp = scale[:, :10], zp[:, :10]
    scale, zp = scale.to(device), zp.to(device)
    mse, cost = ops.range_search(hist, mn, mx, scale, zp, 0, 255, gamma=3.0, product=product)
    rmse, rcost = R.range_search(hist.cpu(), mn.cpu(), mx.cpu(), scale.cpu(), zp.cpu(), 0, 255, 3.0, product)
    torch.testing.assert_close(mse.cpu(), rmse, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(cost.cpu(), rcost, rtol=1e-5, atol=1e-12)
    assert torch.all(cost >= mse - 1e-12)
    # spot-check one candidate against an explicit Python loop over bins
    s0 = float(scale[1, 3].cpu())
    z0 = float(zp[1, 2 if product else 3].cpu())
    em, ec = _brute_force_mse(hist[1].cpu(), float(mn[1]), float(mx[1]), s0, z0, 0, 255, 3.0)
    idx = (1, 3, 2) if product else (1, 3)
    assert mse[idx].item() == pytest.approx(em, rel=1e-4) and cost[idx].item() == pytest.approx(ec, rel=1e-4)


def test_range_search_finds_sensible_range_for_outliers():
    # a Gaussian with a few outliers: the best MSE range clips the outliers at 4 bits
    x = torch.cat([torch.randn(100000), torch.tensor([40.0, -40.0])])
    mn, mx = ops.minmax(x)
    hist = ops.histogram(x, 2048, mn, mx)
    scale, zp = ops.sqnr_candidates(mn, mx, -8, 7, symmetric=True)
    mse, _ = ops.range_search(hist, mn, mx, scale, zp, -8, 7, product=True)
    best = int(mse.reshape(-1).argmin())
    best_scale = float(scale.reshape(-1)[best])
    assert best_scale * 7 < 10  # clips to a few sigma, not +-40
    naive = float(scale[0, -1])
    assert mse.reshape(-1)[best] < mse[0, -1, 0] / 5 and best_scale < naive


def test_range_search_opcheck():
    hist = torch.randint(0, 10, (3, 16)).float()
    lo, hi = torch.full((3,), -1.0), torch.full((3,), 1.0)
    s, z = torch.rand(3, 4) * 0.1 + 0.01, torch.zeros(3, 4)
    torch.library.opcheck(torch.ops.rapidquant.range_search.default, (hist, lo, hi, s, z, -8, 7, 2.0, False))
    torch.library.opcheck(torch.ops.rapidquant.minmax.default, (torch.randn(4, 6), [1, 0]))
    torch.library.opcheck(torch.ops.rapidquant.histogram.default, (torch.randn(4, 6), lo[:1].reshape(1, 1), hi[:1].reshape(1, 1), 8, [0, 0], False))

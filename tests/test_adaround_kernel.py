"""Fused AdaRound kernel against the reference soft rounding and its autograd."""
import pytest
import torch

from rapidquant import ops, reference as R
from rapidquant.ops import _utils as U


def ref(w, v, s, z, qmin, qmax, axis, beta, hard):
    spec = U.block_spec(w.shape, axis, None)
    ps = U.param_shape(w.shape, spec)
    return R.adaround_weight(w, v, s.reshape(ps), z.reshape(ps), qmin, qmax, spec, beta, hard)


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_forward_and_regularizer(device, axis, bits):
    qmin, qmax = ops.qrange(bits, True)
    w = torch.randn(32, 16, 3, 3, device=device) * 0.1
    C = 1 if axis is None else 32
    s = (w.abs().amax() / qmax * torch.ones(C, device=device)) if axis is not None else w.abs().amax() / qmax
    z = torch.zeros_like(s)
    v = torch.randn_like(w) * 3
    out, reg = ops.adaround_weight(w, v, s, z, qmin, qmax, axis=axis, beta=6.0)
    rout, rreg = ref(w, v, s, z, qmin, qmax, axis, 6.0, False)
    # sigmoid is a transcendental: allow a few ulp; everything else is the same fp32 ops
    torch.testing.assert_close(out, rout, rtol=1e-6, atol=float(s.max()) * 1e-6)
    torch.testing.assert_close(reg, rreg, rtol=1e-5, atol=1e-3)
    hout, hreg = ops.adaround_weight(w, v, s, z, qmin, qmax, axis=axis, hard=True)
    rh, _ = ref(w, v, s, z, qmin, qmax, axis, 2.0, True)
    assert torch.equal(hout, rh) and hreg.item() == 0.0  # hard rounding is bit-exact
    # hard rounding with V from the nearest-rounding residual reproduces round-to-nearest
    frac = w / (s if axis is None else s.reshape(-1, 1, 1, 1))
    v_near = torch.where(frac - frac.floor() >= 0.5, 1.0, -1.0)
    near, _ = ops.adaround_weight(w, v_near, s, z, qmin, qmax, axis=axis, hard=True)
    rtn = ops.quantize_dequantize(w, s, z, qmin, qmax, axis=axis)
    assert (near - rtn).abs().max() <= float(s.max()) * 1e-5


@pytest.mark.parametrize("axis", [None, 0])
def test_backward_matches_reference_autograd(device, axis):
    w = torch.randn(16, 8, device=device) * 0.1
    C = 1 if axis is None else 16
    s = torch.full((C,), 0.01, device=device) if axis is not None else torch.tensor(0.01, device=device)
    z = torch.zeros_like(s)
    v = (torch.randn_like(w) * 3).requires_grad_()
    target = torch.randn(16, 8, device=device) * 0.1
    lam = 0.37
    out, reg = ops.adaround_weight(w, v, s, z, -8, 7, axis=axis, beta=4.0)
    ((out - target) ** 2).sum().add(lam * reg).backward()
    v2 = v.detach().clone().requires_grad_()
    rout, rreg = ref(w, v2, s, z, -8, 7, axis, 4.0, False)
    ((rout - target) ** 2).sum().add(lam * rreg).backward()
    torch.testing.assert_close(v.grad, v2.grad, rtol=1e-4, atol=1e-6)
    assert (v.grad == 0).any()  # clipped rectified-sigmoid regions give zero gradient


def test_only_regularizer_gradient():
    w, v = torch.randn(10), torch.randn(10, requires_grad=True)
    _, reg = ops.adaround_weight(w, v, torch.tensor(0.1), torch.tensor(0.0), -8, 7, beta=3.0)
    reg.backward()
    v2 = v.detach().clone().requires_grad_()
    _, rreg = ref(w, v2, torch.tensor(0.1), torch.tensor(0.0), -8, 7, None, 3.0, False)
    rreg.backward()
    torch.testing.assert_close(v.grad, v2.grad, rtol=1e-4, atol=1e-6)


def test_opcheck_and_errors():
    w, v = torch.randn(4, 3), torch.randn(4, 3, requires_grad=True)
    s, z = torch.full((4, 1), 0.05), torch.zeros(4, 1)
    torch.library.opcheck(torch.ops.rapidquant.adaround_forward.default, (w, v, s, z, -8, 7, [1, 0], 2.0, False))
    with pytest.raises(TypeError, match="float32"):
        ops.adaround_weight(w.half(), v, 0.1, 0.0, -8, 7)
    with pytest.raises(ValueError, match="same shape"):
        ops.adaround_weight(w, torch.randn(3, 4), 0.1, 0.0, -8, 7)
    with pytest.raises(ValueError, match="beta must be > 1"):
        ops.adaround_weight(w, v, 0.1, 0.0, -8, 7, beta=1.0)


@pytest.mark.parametrize("axis", [None, 0])
def test_eager_cpu_path_matches_the_op_for_parameters(axis):
    """The learned rounding variables are nn.Parameters (block reconstruction): on CPU the
    soft rounding skips the dispatcher for them too (an autograd.Function over the same
    kernels), with the op's weight, regularizer and gradient bit for bit."""
    torch.manual_seed(3)
    w = torch.randn(16, 8, 3, 3)
    C = 1 if axis is None else 16
    s, z = torch.rand(C) * 0.05 + 0.02, torch.randint(-3, 3, (C,)).float()
    v0 = torch.randn(16, 8, 3, 3)
    g = torch.randn(16, 8, 3, 3)
    outs = []
    for eager in (True, False):
        v = torch.nn.Parameter(v0.clone())
        if eager:
            wt, reg = ops.adaround_weight(w, v, s, z, -8, 7, axis=axis, beta=4.0)
            assert type(wt.grad_fn).__name__ == "_EagerBackward"
        else:
            spec = U.block_spec(w.shape, axis, None)
            ps = U.param_shape(w.shape, spec)
            wt, reg = torch.ops.rapidquant.adaround_forward(w, v, s.reshape(ps), z.reshape(ps), -8, 7, spec, 4.0,
                                                            False)
        (wt * g).sum().add(reg * 0.3).backward()
        outs.append((wt.detach(), reg.detach(), v.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert outs[0][2].abs().sum() > 0

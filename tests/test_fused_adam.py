"""FusedAdam (the rounding optimizations' Adam) against torch.optim.Adam(fused=True)."""
import pytest
import torch

from rapidquant.techniques.fused_adam import FusedAdam


def _groups(seed, device):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, dtype=torch.float32: torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    return [{"params": [make(16, 3, 3, 3), make(7)], "lr": 5e-2},
            {"params": [make(16), make(5, dtype=torch.bfloat16)], "lr": 1e-2},
            {"params": [make(())], "lr": 2e-3}]


@pytest.mark.parametrize("betas,eps", [((0.9, 0.999), 1e-8), ((0.8, 0.99), 1e-6)])
def test_same_steps_as_torch_fused_adam_bit_for_bit(device, betas, eps):
    ours, theirs = _groups(0, device), _groups(0, device)
    a = FusedAdam(ours, betas=betas, eps=eps)
    b = torch.optim.Adam([dict(g) for g in theirs], betas=betas, eps=eps, fused=True)
    g = torch.Generator().manual_seed(1)
    for step in range(25):
        a.zero_grad()
        b.zero_grad(set_to_none=True)
        for go, gt in zip(ours, theirs):
            for i, (po, pt) in enumerate(zip(go["params"], gt["params"])):
                if step % 4 == 3 and i == 1:
                    continue  # no gradient this step: the parameter and its moments stay
                if step < 5 and go is ours[-1]:
                    continue  # its first gradient comes late: its state starts then
                grad = torch.randn(po.shape, generator=g).to(po.device, po.dtype)
                po.grad, pt.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    for go, gt in zip(ours, theirs):
        for po, pt in zip(go["params"], gt["params"]):
            assert po.dtype == pt.dtype and torch.equal(po, pt)
            mo, vo, so = a.state[po]
            st = b.state[pt]
            assert torch.equal(mo, st["exp_avg"]) and torch.equal(vo, st["exp_avg_sq"]) and torch.equal(so, st["step"])
            assert so.dtype == st["step"].dtype == torch.float32


def test_bad_groups_are_refused():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="no parameters"):
        FusedAdam([{"params": [], "lr": 1e-2}])
    with pytest.raises(ValueError, match="require grad"):
        FusedAdam([{"params": [torch.zeros(3)], "lr": 1e-2}])
    with pytest.raises(ValueError, match="leaf"):
        FusedAdam([{"params": [p * 2], "lr": 1e-2}])
    with pytest.raises(ValueError, match="more than one"):
        FusedAdam([{"params": [p], "lr": 1e-2}, {"params": [p], "lr": 1e-3}])
    with pytest.raises(ValueError, match="'params' and 'lr' only"):
        FusedAdam([{"params": [p], "lr": 1e-2, "weight_decay": 0.1}])
    with pytest.raises(ValueError, match="'params' and 'lr' only"):
        FusedAdam([{"params": [p]}])

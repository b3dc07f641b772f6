"""Adam for the rounding optimizations: torch.optim.Adam(fused=True)'s update, bit for bit,
without torch.optim around it.

AdaRound and block reconstruction take thousands of tiny steps. torch.optim wraps each one
in bookkeeping (profiler records, per-step regrouping, state lookups), and creating any
torch.optim optimizer imports torch._dynamo (about 1.1 s, once per process, on this
project's 2-core machine) even when nothing is compiled. Here each step is one
``torch._fused_adam_`` call per group and (device, dtype): the kernel torch.optim calls.
"""
from __future__ import annotations

import torch


class FusedAdam:
    """Adam (no weight decay, no amsgrad) over ``groups``: dicts with ``params`` and ``lr``,
    as torch.optim takes them. Parameters without a gradient at a step are left as they are
    (their moments and step count too), as in torch.optim."""

    def __init__(self, groups: list, betas: tuple = (0.9, 0.999), eps: float = 1e-8):
        self.param_groups = [dict(g, params=list(g["params"])) for g in groups]
        seen = set()
        for g in self.param_groups:
            if set(g) != {"params", "lr"}:
                raise ValueError(f"each Adam parameter group takes 'params' and 'lr' only (got {sorted(g)}); "
                                 "betas and eps are FusedAdam's own arguments")
            if not g["params"]:
                raise ValueError("an Adam parameter group has no parameters")
            for p in g["params"]:
                if not p.is_floating_point() or not p.requires_grad or not p.is_leaf:
                    raise ValueError(f"Adam learns floating-point leaf tensors that require grad (got a {p.dtype} "
                                     f"tensor, requires_grad={p.requires_grad}, leaf={p.is_leaf})")
                if id(p) in seen:
                    raise ValueError("a tensor is in more than one Adam parameter group (it would step twice)")
                seen.add(id(p))
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.state: dict = {}  # parameter -> (exp_avg, exp_avg_sq, step)

    def zero_grad(self) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            by_kind: dict = {}
            for p in g["params"]:
                if p.grad is None:
                    continue
                if p not in self.state:
                    self.state[p] = (torch.zeros_like(p, memory_format=torch.preserve_format),
                                     torch.zeros_like(p, memory_format=torch.preserve_format),
                                     torch.zeros((), dtype=torch.float32, device=p.device))
                by_kind.setdefault((p.device, p.dtype), []).append(p)
            for ps in by_kind.values():
                m, v, steps = zip(*(self.state[p] for p in ps))
                torch._foreach_add_(steps, 1)
                torch._fused_adam_(ps, [p.grad for p in ps], list(m), list(v), [], list(steps), amsgrad=False,
                                   lr=g["lr"], beta1=self.beta1, beta2=self.beta2, weight_decay=0.0, eps=self.eps,
                                   maximize=False, grad_scale=None, found_inf=None)

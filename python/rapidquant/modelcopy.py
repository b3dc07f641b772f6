"""Copying a user's model without touching it."""
from __future__ import annotations

import copy

import torch
from torch import nn


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for models with the hook-based
    ``torch.nn.utils.weight_norm``: its computed ``weight`` is a non-leaf tensor, which
    deepcopy refuses. Those attributes are detached for the copy and put back afterwards
    (the hook recomputes them before every forward anyway)."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as e:
        if "deepcopy protocol" not in str(e):
            raise
    from torch.nn.utils.weight_norm import WeightNorm
    saved = []
    for m in model.modules():
        for hook in getattr(m, "_forward_pre_hooks", {}).values():
            if isinstance(hook, WeightNorm) and isinstance(getattr(m, hook.name, None), torch.Tensor):
                saved.append((m, hook.name, getattr(m, hook.name)))
                setattr(m, hook.name, getattr(m, hook.name).detach())
    try:
        return copy.deepcopy(model)
    finally:
        for m, name, value in saved:
            setattr(m, name, value)

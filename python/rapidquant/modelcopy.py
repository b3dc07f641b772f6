"""Copying a user's model without touching it, and turning computed weights into plain ones."""
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
    saved = []
    for m in model.modules():
        for name in _hook_weight_norms(m):
            if isinstance(getattr(m, name, None), torch.Tensor):
                saved.append((m, name, getattr(m, name)))
                setattr(m, name, getattr(m, name).detach())
    try:
        return copy.deepcopy(model)
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def _hook_weight_norms(m: nn.Module) -> list[str]:
    """Names the hook-based ``torch.nn.utils.weight_norm`` computes on ``m``: it keeps
    ``<name>_g`` and ``<name>_v`` as parameters and ``<name>`` as a plain tensor."""
    params = dict(m.named_parameters(recurse=False))
    return [n[:-2] for n in params if n.endswith("_g") and n[:-2] + "_v" in params
            and n[:-2] not in params and isinstance(getattr(m, n[:-2], None), torch.Tensor)]


def bake_computed_weights(model: nn.Module) -> list[str]:
    """Replace computed weights (``torch.nn.utils.parametrizations.weight_norm``,
    ``spectral_norm``, any ``parametrize`` registration, and the older hook-based
    ``torch.nn.utils.weight_norm``) by plain parameters holding their current value, in place,
    so that a conv or linear keeps its weight quantizer instead of reading an activation and
    a technique that writes the weight writes what the layer uses. Returns the names baked."""
    from torch.nn.utils import parametrize
    baked = []
    for path, m in list(model.named_modules()):
        if parametrize.is_parametrized(m):
            # the parametrized class (holding the weight property) is shared with every copy of
            # the module, the user's included: removal deletes from it, so give this one its own
            cls = type(m)
            m.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            for name in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
                baked.append(f"{path}.{name}" if path else name)
        for name in _hook_weight_norms(m):  # weight = g * v / |v|, recomputed before each forward
            torch.nn.utils.remove_weight_norm(m, name)
            baked.append(f"{path}.{name}" if path else name)
    return baked


def has_computed_weights(model: nn.Module) -> bool:
    from torch.nn.utils import parametrize
    return any(parametrize.is_parametrized(m) or _hook_weight_norms(m) for m in model.modules())

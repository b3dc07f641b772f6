"""Batch plumbing shared by QuantSim, the techniques and the searches (ground floor: torch only).

A batch is a tensor, a tuple/list of positional inputs (possibly longer than the model's
inputs, e.g. ``(x, label)`` from a DataLoader), a dict of keyword inputs (a tokenizer's
output) or an explicit ``(args, kwargs)`` pair: a 2-tuple whose first element is a
tuple/list and whose second is a dict.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn


def tensors(x) -> list[torch.Tensor]:
    """Every tensor inside a nested batch (tuples, lists, dicts)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensors(v)]
    return []


def map_tensors(x, fn):
    """A nested batch with fn applied to every tensor (other values unchanged)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(map_tensors(v, fn) for v in x)
    if isinstance(x, dict):
        return type(x)((k, map_tensors(v, fn)) for k, v in x.items()) if type(x) is not dict else \
            {k: map_tensors(v, fn) for k, v in x.items()}
    return x


def to_device(x, device):
    """Move every tensor of a nested batch to device (other values unchanged)."""
    return map_tensors(x, lambda t: t.to(device))


def model_float_dtype(model: torch.nn.Module, strict: bool = True) -> torch.dtype | None:
    """The floating dtype of a model's parameters (None when it has none); mixed dtypes
    give a clear error, since batches could match only one of them (None with strict=False)."""
    from rapidquant.quantizer import Quantizer  # a sim's learnable ranges stay fp32
    dts = {p.dtype for m in model.modules() if not isinstance(m, Quantizer)
           for p in m.parameters(recurse=False) if p.is_floating_point()}
    if len(dts) > 1 and not strict:
        return None
    if len(dts) > 1:
        raise TypeError(f"the model mixes parameter dtypes {sorted(str(d) for d in dts)}; the layer-wise "
                        "techniques need one floating dtype: convert it with model.to(dtype) first")
    return next(iter(dts), None)


def cast_floats(x, dtype: torch.dtype | None):
    """Cast every floating tensor of a nested batch to dtype (indices and masks of other
    dtypes unchanged), as the batch is moved to the model's device."""
    if dtype is None:
        return x
    return map_tensors(x, lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t)


def unmarked(x):
    """The same tensors as new objects. torch.export writes dynamic-dimension marks onto the
    tensor objects it is given (``_dynamo_*_indices``) and a later export of those objects
    inherits them: the user's tensors must not carry our capture into their next export."""
    return map_tensors(x, torch.Tensor.detach)


def is_args_kwargs(batch) -> bool:
    """True for an explicit (args, kwargs) pair."""
    return (isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], (tuple, list))
            and isinstance(batch[1], dict))


def split_batch(batch) -> tuple[tuple, dict]:
    """(args, kwargs) of a batch. Mappings (dict, a tokenizer's BatchEncoding) are keyword inputs."""
    if is_args_kwargs(batch):
        return tuple(batch[0]), dict(batch[1])
    if isinstance(batch, dict) or _is_mapping(batch):
        return (), dict(batch)
    if isinstance(batch, (list, tuple)):
        return tuple(batch), {}
    return (batch,), {}


def _is_mapping(x) -> bool:
    from collections.abc import Mapping
    return isinstance(x, Mapping)


@dataclass(frozen=True)
class InputSignature:
    """The inputs a captured model takes: names in call order, how many are positional in
    the dummy input, and which names came as keywords."""
    names: tuple[str, ...]
    n_positional: int
    keywords: tuple[str, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.names)


def count_inputs(dummy_input) -> int:
    """Number of model inputs in a dummy input (positional plus keyword)."""
    args, kwargs = split_batch(dummy_input)
    return len(args) + len(kwargs)


def call_model(model: nn.Module, batch, n_inputs=None):
    """Run model on a batch of any structure (see the module docstring).

    ``n_inputs`` (an int or an InputSignature) trims batches longer than the model's
    positional inputs; with a signature, dict keys the model does not take are dropped
    (a tokenizer's ``token_type_ids`` for a sim captured without them).
    """
    args, kwargs = model_args(batch, n_inputs)
    return model(*args, **kwargs)


def model_args(batch, n_inputs=None) -> tuple[tuple, dict]:
    """The (args, kwargs) call_model passes to the model for this batch."""
    args, kwargs = split_batch(batch)
    if isinstance(n_inputs, InputSignature):
        if kwargs:
            kwargs = {k: v for k, v in kwargs.items() if k in n_inputs.names}
        args = args[:max(len(n_inputs.names) - len(kwargs), 0)]
    elif n_inputs is not None and not kwargs:
        args = args[:n_inputs]
    return tuple(args), kwargs


def forward_parameters(model: nn.Module) -> list[inspect.Parameter]:
    """The parameters of model.forward (without self)."""
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return []

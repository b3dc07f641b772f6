"""Run an exported ONNX model in onnxruntime as if it were a torch module.

``OnnxRuntimeModule(path)`` takes the same positional and keyword inputs as the model it
was exported from and returns torch tensors, in the original output structure when one is
given (``output_like``: an output of the torch model, e.g. a ``BaseModelOutput``). A
user's ``eval_fn(model)`` can then score the deployed file unchanged. Default session
options (all graph optimizations on) are what a deployment runs, so they are the default.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

LEVELS = ("default", "disable_all", "basic", "extended")


def make_session(path: str, optimization: str = "default", threads: int | None = None):
    """An onnxruntime CPU session; ``optimization`` names onnxruntime's graph optimization level."""
    import onnxruntime as ort
    if optimization not in LEVELS:
        raise ValueError(f"optimization must be one of {LEVELS}, got {optimization!r}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if optimization != "default":
        so.graph_optimization_level = {
            "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[optimization]
    if threads is not None:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class OnnxRuntimeModule(nn.Module):
    """A torch-callable view of an ONNX model in onnxruntime (CPU execution provider).

    Positional inputs fill the graph's inputs in order; keyword inputs are matched by name.
    Outputs come back as CPU torch tensors: one tensor, a tuple, or the structure of
    ``output_like``. Gradients do not flow through it.
    """

    def __init__(self, path: str, *, optimization: str = "default", threads: int | None = None,
                 output_like=None):
        super().__init__()
        self.path = path
        self.optimization = optimization
        self.session = make_session(path, optimization, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._spec = None
        if output_like is not None:
            leaves, self._spec = pytree.tree_flatten(output_like)
            n_out = len(self.session.get_outputs())
            if len(leaves) != n_out or not all(isinstance(v, torch.Tensor) for v in leaves):
                self._spec = None  # structure does not line up with the graph: return a tuple

    def feeds(self, args, kwargs) -> dict:
        names = list(self.input_names)
        feeds = {}
        for k, v in kwargs.items():
            if k not in names:
                raise TypeError(f"{self.path} has no input named {k!r}; its inputs are {self.input_names}")
            feeds[k] = _numpy(v)
        free = [n for n in names if n not in feeds]
        if len(args) > len(free):
            raise TypeError(f"{self.path} takes {len(names)} inputs ({names}), got {len(args)} positional "
                            f"and {len(kwargs)} keyword inputs")
        feeds.update({n: _numpy(a) for n, a in zip(free, args)})
        missing = [n for n in names if n not in feeds]
        if missing:
            raise TypeError(f"{self.path}: missing inputs {missing}")
        return feeds

    def forward(self, *args, **kwargs):
        outs = [torch.from_numpy(np.ascontiguousarray(o)) for o in self.session.run(None, self.feeds(args, kwargs))]
        if self._spec is not None:
            return pytree.tree_unflatten(outs, self._spec)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def extra_repr(self) -> str:
        return f"{self.path!r}, optimization={self.optimization!r}, inputs={self.input_names}"

"""Float leaves made exportable: each one replaced, for the export only, by its aten graph.

A float leaf is a module that graph capture could not trace (sim.float_leaves): typically it
reads constant tensor arguments as Python values (``.tolist()``, ``.numpy()``, ``if
torch.any(shape == 0)``), as onnx2torch's Resize, Slice, Reshape and Div do with the ONNX
initializers they receive. torch.export fakes those constants and fails on the same lines.

For the export, each leaf is recorded with ``make_fx(tracing_mode="real")`` on the inputs it
receives when the sim runs the dummy input, its constant arguments (graph attributes) baked
in: every such decision is taken on the real values, exactly as the leaf takes it. A recorded
leaf is used only where it returns bit-identical outputs. Each dim the file is to keep free
(the batch, a time axis) is checked by recording the leaf again with the input doubled along
it: a leaf whose graph changes reads that size as a Python int, and the dim stays fixed in
the file (the caller says so); otherwise the file would take other sizes and compute wrong
shapes silently.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import fx, nn

from rapidquant.batches import map_tensors, tensors


class _Recorded(nn.Module):
    """Stands in for a leaf; the call site's constant arguments (baked in) are dropped."""

    def __init__(self, graph: fx.GraphModule, free: list):
        super().__init__()
        self.graph_module = graph
        self.free = free  # positions (int) and keywords (str) the recorded graph takes, in order

    def forward(self, *args, **kwargs):
        return self.graph_module(*[args[k] if isinstance(k, int) else kwargs[k] for k in self.free])


def _inner(model, path: str) -> str | None:
    """The path of the float module a leaf's call runs: the module a QuantizedModule wraps (its
    output quantizer stays outside the recording); None for a leaf whose weights are quantized."""
    from rapidquant.qmodules import QuantizedModule
    m = model.get_submodule(path)
    if isinstance(m, QuantizedModule):
        return None if m.param_quantizers else path + ".module"
    return path


def _call_sites(gm: fx.GraphModule, paths) -> dict:
    """float module path -> positions/keywords of its leaf's (single) call's arguments that are
    graph constants."""
    sites: dict = {}
    for node in gm.graph.nodes:
        inner = _inner(gm, node.target) if node.op == "call_module" and node.target in paths else None
        if inner:
            if inner in sites:
                sites[inner] = None  # called twice: left as it is
                continue
            named = {**dict(enumerate(node.args)), **node.kwargs}
            sites[inner] = {k for k, a in named.items() if isinstance(a, fx.Node) and a.op == "get_attr"}
    return {k: v for k, v in sites.items() if v is not None}


def _leaf_inputs(model, sites: dict, args: tuple) -> dict:
    """The arguments each leaf receives when the model runs ``args``: {position or keyword: value}."""
    seen: dict = {}
    hooks = []
    for path in sites:
        def pre(mod, a, kw, path=path):
            seen.setdefault(path, {**dict(enumerate(a)), **kw})
        hooks.append(model.get_submodule(path).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _call(leaf: nn.Module, named: dict):
    """leaf called with {position or keyword: value}."""
    return leaf(*[named[k] for k in sorted(k for k in named if isinstance(k, int))],
                **{k: v for k, v in named.items() if isinstance(k, str)})


def _record(leaf: nn.Module, inputs: dict, variants: dict, constants: set):
    """(recorded module, the keys of ``variants`` it bakes) or None where recording fails or
    changes the output. ``variants``: key -> the leaf's inputs when the model runs an input
    doubled along one dim (None: the model cannot run that, or does not reach the leaf)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    free = [k for k in inputs if k not in constants]

    def record(given: dict):
        # real tensors: every value the leaf reads as a Python number is read, and baked in
        return make_fx(lambda *xs: _call(leaf, {**given, **dict(zip(free, xs))}), tracing_mode="real",
                       _error_on_data_dependent_ops=False)(*[given[k] for k in free])

    try:
        with torch.no_grad():
            gm = record(inputs)
            if not _same(gm(*[inputs[k] for k in free]), _call(leaf, inputs)):
                return None
            # a graph that differs at twice the size read the size (or a shape holding it)
            baked = {key for key, v in variants.items()
                     if v is None or set(v) != set(inputs) or _recorded_code(record, v) != gm.code}
    except Exception:  # noqa: BLE001 - a leaf that cannot be recorded stays as it is
        return None
    return _Recorded(gm, free), baked


def _recorded_code(record, given: dict) -> str | None:
    try:
        return record(given).code
    except Exception:  # noqa: BLE001 - a leaf that cannot be recorded at that size fixes it
        return None


def _doubled(args: tuple, index, dim: int) -> tuple:
    """args with every tensor whose size at ``dim`` equals the chosen one doubled along it:
    the batch (index "batch": every input's dim 0), or input ``index``'s dim, shared with the
    inputs of the same size there (input ids and their mask)."""
    first = [t for t in tensors(args) if t.dim()]
    ref = args[index] if index != "batch" else (first[0] if first else None)
    if not isinstance(ref, torch.Tensor) or ref.dim() <= dim:
        return args
    size = ref.shape[dim]
    return map_tensors(args, lambda t: torch.cat([t, t], dim) if t.dim() > dim and t.shape[dim] == size else t)


@contextlib.contextmanager
def recorded_float_leaves(sim, args: tuple, dims: list = ()):
    """Within the block, sim.model's float leaves are their recorded aten graphs. ``dims``:
    per input, the dims besides the batch the file is to keep free. Yields {key: [paths of
    the leaves whose recording fixes it]} for key "batch" and each (input index, dim); [None]
    where the model itself does not run with that dim doubled."""
    model = sim.model
    paths = set(getattr(sim, "float_leaves", {}) or {})
    if not paths or not isinstance(model, fx.GraphModule):
        yield {}
        return
    sites = _call_sites(model, paths)
    inputs = _leaf_inputs(model, sites, args)
    keys = [("batch", 0)] + [(i, d) for i, ds in enumerate(dims) for d in ds]
    variants = {}
    for index, dim in keys:  # the same at twice the size: which recordings hold for any size
        try:
            variants[index if index == "batch" else (index, dim)] = _leaf_inputs(
                model, sites, _doubled(args, index, dim))
        except Exception:  # noqa: BLE001 - a model that runs only at the dummy's size there
            variants[index if index == "batch" else (index, dim)] = {}
    swapped = {}
    fixed = {key: [None] for key, v in variants.items() if not v}  # the model does not run at that size
    for path, constants in sites.items():
        if path not in inputs:
            continue
        leaf = model.get_submodule(path)
        got = _record(leaf, inputs[path], {k: v.get(path) for k, v in variants.items()}, constants)
        if got is None:
            continue
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        swapped[path] = (owner, name, leaf)
        setattr(owner, name, got[0])
        for key in got[1]:
            if fixed.get(key) != [None]:
                fixed.setdefault(key, []).append(path)
    if fixed.get("batch") and fixed["batch"] != [None]:
        warnings.warn(f"export: {len(fixed['batch'])} float leaves read the batch size as a number "
                      f"({fixed['batch'][:4]}); the exported file has the dummy input's batch size", stacklevel=3)
    try:
        yield fixed
    finally:
        for owner, name, leaf in swapped.values():
            setattr(owner, name, leaf)

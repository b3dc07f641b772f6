"""Graph capture for QuantSim: torch.fx symbolic tracing, else torch.export (non-strict).

Both paths end in an ``fx.GraphModule`` whose known layers (Conv, Linear, LayerNorm, ...,
quantized twins) are ``call_module`` nodes under their original names, so quantizers are
reachable by name and the techniques see the same modules whichever path captured:

1. torch.fx symbolic tracing (module-level graph, torch functions).
2. torch.export, non-strict, every input dimension dynamic where the model allows: an
   aten-level graph in which the nodes of each known layer are folded back into one
   ``call_module`` node (using the exporter's module stack), inputs by name and
   dict/dataclass outputs kept (the exporter's pytree codegen).
3. torch.fx again, keeping each module whose forward cannot be traced as a float leaf
   (its output quantized; listed in ``float_leaves`` with the reason).

``scaled_dot_product_attention`` is decomposed into scores -> mask -> softmax -> matmul
so the hardware config can place quantizers on the softmax and both matmuls while the
mask is applied exactly.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import linecache
import logging
import operator
import os
import re
import sys
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from rapidquant import graph as G
from rapidquant.batches import map_tensors, unmarked
from rapidquant.batches import forward_parameters

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Captured:
    gm: fx.GraphModule
    method: str                                      # "torch.fx" or "torch.export"
    float_leaves: dict = field(default_factory=dict)  # module path -> why it stayed whole in float
    input_names: tuple = ()                          # the graph's real inputs, in call order
    notes: list = field(default_factory=list)        # why earlier capture paths were not used
    fixed_sizes: dict = field(default_factory=dict)  # torch.export: input -> {dim: size} it could not keep free
    fixed_why: str = ""                              # why, when no size could be kept free


@dataclass
class _Failure:
    method: str
    module: str | None
    where: str | None        # "file:line: source"
    why: str
    error: BaseException

    def describe(self) -> str:
        loc = f" in module '{self.module}'" if self.module else ""
        at = f" at {self.where}" if self.where else ""
        return f"{self.method}{loc}{at}: {self.why}"


# ------------------------------------------------------------------ attention, decomposed
def attention_scores(q, k, scale=None, enable_gqa: bool = False):
    """q @ k^T * scale (SDPA's first matmul, one quantizer on the scaled scores)."""
    if enable_gqa and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
    s = q.size(-1) ** -0.5 if scale is None else scale
    return torch.matmul(q, k.transpose(-2, -1)) * s


def apply_attention_mask(scores, mask=None, is_causal: bool = False):
    """Apply a bool or additive mask exactly (never quantized: it carries dtype-min values)."""
    low = torch.finfo(scores.dtype).min
    if is_causal:
        L, S = scores.size(-2), scores.size(-1)
        keep = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, low)
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, low)
    return scores + mask


def attention_values(p, v, enable_gqa: bool = False):
    """softmax(scores) @ v (SDPA's second matmul)."""
    if enable_gqa and v.size(-3) != p.size(-3):
        v = v.repeat_interleave(p.size(-3) // v.size(-3), -3)
    return torch.matmul(p, v)


G.FUNCTIONS[attention_scores] = "MatMul"
G.FUNCTIONS[attention_values] = "MatMul"
G.PASSTHROUGH_FUNCTIONS.add(apply_attention_mask)
_SDPA = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}


def decompose_attention(gm: fx.GraphModule) -> None:
    """Replace each scaled_dot_product_attention node by its four steps."""
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        a = dict(zip(names, node.args))
        a.update(node.kwargs)
        gqa = bool(a.get("enable_gqa", False))
        with g.inserting_before(node):
            s = g.call_function(attention_scores, (a["query"], a["key"]), {"scale": a.get("scale"), "enable_gqa": gqa})
            s = g.call_function(apply_attention_mask, (s, a.get("attn_mask")), {"is_causal": a.get("is_causal", False)})
            p = g.call_function(F.softmax, (s,), {"dim": -1})
            if a.get("dropout_p"):
                p = g.call_function(F.dropout, (p,), {"p": a["dropout_p"]})
            out = g.call_function(attention_values, (p, a["value"]), {"enable_gqa": gqa})
        for new in (s, p, out):
            new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        node.replace_all_uses_with(out)
        g.erase_node(node)
    g.lint()
    gm.recompile()


# ------------------------------------------------------------------ failure reports
def _user_frame(e: BaseException) -> str | None:
    """'file:line: source' of the innermost frame of the user's code in e's traceback."""
    best = None
    for f in traceback.extract_tb(e.__traceback__):
        path = os.path.abspath(f.filename)
        if path.startswith(_TORCH_DIR) or path.startswith(_OWN_DIR) or "/site-packages/torch" in path:
            continue
        if "/lib/python3" in path and "site-packages" not in path:
            continue  # the standard library (contextlib, inspect, ...)
        best = f
    if best is None:
        m = re.search(r'File "([^"]+)", line (\d+)', str(e))  # torch.export names it in the message
        if m:
            src = linecache.getline(m.group(1), int(m.group(2))).strip()
            return f"{m.group(1)}:{m.group(2)}" + (f": `{src}`" if src else "")
        return None
    src = (best.line or "").strip()
    return f"{best.filename}:{best.lineno}" + (f": `{src}`" if src else "")


_DTYPE_QUERY = re.compile(r"\.dtype\b|\.is_floating_point\(|\.is_complex\(|\.is_signed\(")


def _why(e: BaseException, where: str | None = None) -> str:
    """Why a capture failed, in words; ``where`` ('file:line: `source`') refines it."""
    msg = str(e)
    if "control flow" in msg and where and _DTYPE_QUERY.search(where):
        return ("a branch on a tensor's dtype (torch.fx's symbolic values carry no dtype; the "
                "module's values are not what decides it)")
    if "control flow" in msg or "data-dependent" in msg or "GuardOnDataDependent" in type(e).__name__:
        return "data-dependent Python control flow (a branch, loop or int()/bool() on a tensor's values)"
    if "Proxy" in msg or isinstance(e, (TypeError, AttributeError)):
        first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
        return f"an unsupported Python construct on a traced value ({type(e).__name__}: {first[:200]})"
    first = msg.strip().splitlines()[0] if msg.strip() else ""
    return f"{type(e).__name__}: {first[:300]}"


# ------------------------------------------------------------------ torch.fx
class _FxFailed(Exception):
    def __init__(self, failure: _Failure):
        super().__init__(failure.describe())
        self.failure = failure


def _fx_capture(model, args, kwargs, leaf_types, leaf_names, concrete_args) -> fx.GraphModule:
    concrete = dict(concrete_args or {})
    params = forward_parameters(model)
    given = {p.name for p in params[:len(args)]} | set(kwargs)
    for p in params:  # keyword-only calls: the other arguments keep their defaults
        if kwargs and p.name not in given and p.name not in concrete and p.default is not inspect.Parameter.empty \
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            concrete[p.name] = p.default
    tracer = G._Tracer(tuple(leaf_types), set(leaf_names))
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # noqa: BLE001 - reported as one readable failure
        where = _user_frame(e)
        raise _FxFailed(_Failure("torch.fx", tracer.failed_in, where, _why(e, where), e)) from e
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    _drop_constant_placeholders(gm, concrete)
    _inline_integer_scalars(gm)
    _inline_pad_values(gm)
    return gm


_INDEX_KWARGS = {"dim", "dims", "axis", "start", "end", "step", "index", "chunks", "split_size_or_sections",
                 "repeats", "shifts", "source", "destination", "start_dim", "end_dim", "dim0", "dim1", "length"}
_INDEX_METHODS = {"squeeze", "unsqueeze", "select", "narrow", "flatten", "transpose", "permute", "split", "chunk",
                  "repeat", "expand", "view", "reshape", "roll", "movedim", "unflatten", "size"}
_INDEX_FUNCTIONS = {torch.squeeze, torch.unsqueeze, torch.select, torch.narrow, torch.flatten, torch.transpose,
                    torch.split, torch.chunk, torch.roll, torch.movedim, torch.reshape, torch.permute}


def _inline_integer_scalars(gm: fx.GraphModule) -> None:
    """Turn 0-d integer tensor constants into Python ints where they are indices.

    Modules that read their indices from tensors (onnx2torch's Slice, Squeeze, Gather walk
    the ONNX initializers) hand torch.fx 0-d integer tensors that it stores as
    ``_tensor_constantN``. Eager code accepts them as slice bounds and ``dim=``, but the ONNX
    export fakes every tensor, and a fake slice bound is a data-dependent value it cannot
    specialise. As ints they are what the model meant: fixed indices. Only index positions
    change (subscripts, dims and sizes of shape ops); a tensor operand stays a tensor.
    """
    g = gm.graph
    changed = False
    for node in [n for n in g.nodes if n.op == "get_attr"]:
        t = getattr(gm, node.target, None) if "." not in node.target else None
        if not (isinstance(t, torch.Tensor) and t.dim() == 0 and not t.is_floating_point()
                and not t.is_complex() and t.dtype != torch.bool):
            continue
        value = int(t)

        def swap(a, node=node, value=value):
            return value if a is node else fx.node.map_aggregate(a, lambda x: value if x is node else x)
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem and user.args[0] is not node:
                user.args = (user.args[0], swap(user.args[1])) + tuple(user.args[2:])
            elif (user.op == "call_method" and user.target in _INDEX_METHODS and user.args[0] is not node) or \
                    (user.op == "call_function" and user.target in _INDEX_FUNCTIONS and user.args[0] is not node):
                user.args = (user.args[0],) + tuple(swap(a) for a in user.args[1:])
            user.kwargs = {k: (swap(v) if k in _INDEX_KWARGS else v) for k, v in user.kwargs.items()}
            changed = True
        if not node.users:
            g.erase_node(node)
    if changed:
        g.lint()
        gm.recompile()


def _attr(module: nn.Module, target: str):
    """The attribute a get_attr or call_module target names (a dotted path)."""
    return functools.reduce(getattr, target.split("."), module)


def _inline_pad_values(gm: fx.GraphModule) -> None:
    """F.pad's fill value read from a one-element float tensor constant (onnx2torch's Pad
    passes the ONNX Pad's constant_value input) becomes a Python float: the ONNX export fakes
    every tensor, and F.pad cannot take a fake as its value."""
    changed = False
    for node in gm.graph.nodes:
        if not (node.op == "call_function" and node.target is F.pad):
            continue
        v = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        if not (isinstance(v, fx.Node) and v.op == "get_attr"):
            continue
        t = _attr(gm, v.target)
        if not (isinstance(t, torch.Tensor) and t.numel() == 1 and t.is_floating_point()):
            continue
        if "value" in node.kwargs:
            node.kwargs = {**node.kwargs, "value": float(t)}
        else:
            node.args = node.args[:3] + (float(t),) + node.args[4:]
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


def _delete_unused_submodules(gm: fx.GraphModule) -> None:
    """GraphModule.delete_all_unused_submodules, but keeping what nested graphs use: torch.export
    records a ``with torch.no_grad(): with torch.autocast(...)`` block as a subgraph holding
    its own subgraph, whose module the plain version deletes."""
    used, whole = set(), set()  # paths on the way to a used attribute; modules called whole

    def mark(graph_module, prefix):
        for n in graph_module.graph.nodes:
            if n.op in ("call_module", "get_attr"):
                parts = (prefix + n.target).split(".")
                used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
                sub = _attr(graph_module, n.target)
                if isinstance(sub, fx.GraphModule):
                    mark(sub, prefix + n.target + ".")  # a nested graph says what it uses
                elif n.op == "call_module":
                    whole.add(prefix + n.target)  # its own forward uses all it holds
    mark(gm, "")
    for name, _ in sorted(gm.named_modules(), key=lambda kv: -kv[0].count(".")):
        if name and name not in used and not any(name.startswith(w + ".") for w in whole):
            gm.delete_submodule(name)


def _drop_constant_placeholders(gm: fx.GraphModule, concrete: dict) -> None:
    """Remove the placeholders torch.fx keeps for concrete_args (and their guards): they are
    constants of the captured graph, not inputs (nothing to quantize, nothing to pass)."""
    g = gm.graph
    guards = (torch._assert, fx._symbolic_trace._assert_is_none)
    for node in [n for n in g.nodes if n.op == "placeholder"]:
        base = re.sub(r"_\d+$", "", node.target)
        if node.target not in concrete and base not in concrete:
            continue
        for user in list(node.users):
            for u in list(user.users):
                if u.op == "call_function" and u.target in guards:
                    g.erase_node(u)
            if user.op == "call_function" and (user.target in guards or not user.users):
                g.erase_node(user)
        if not node.users:
            g.erase_node(node)
    g.lint()
    gm.recompile()


def _fx_with_float_leaves(model, args, kwargs, leaf_types, leaf_names, concrete_args):
    """torch.fx, keeping each module whose forward cannot be traced whole (innermost first)."""
    leaves, float_leaves = set(leaf_names), {}
    for _ in range(256):
        try:
            return _fx_capture(model, args, kwargs, leaf_types, leaves, concrete_args), float_leaves
        except _FxFailed as f:
            path = f.failure.module
            if path is None or path in leaves or path == "":
                raise
            leaves.add(path)
            float_leaves[path] = f.failure.describe()
    raise RuntimeError("too many untraceable modules")


def trace_modules(model: nn.Module) -> tuple[fx.GraphModule, dict]:
    """The module graph BN folding and CLE walk: torch.fx, keeping each module whose forward
    cannot be traced whole, as QuantSim's capture does (onnx2torch's Resize, Python shape
    logic). Returns (graph module, {module path: why it stayed whole})."""
    try:
        return _fx_with_float_leaves(model, (), {}, (), (), None)
    except _FxFailed as f:
        raise G.TraceError(f"BN folding and CLE need a torch.fx trace of the model, and the model's own forward "
                           f"cannot be traced ({f.failure.describe()}); apply them to its traceable submodules "
                           "(e.g. model.backbone) instead") from f


# ------------------------------------------------------------------ torch.export
def _dynamic_shapes(model, args, kwargs):
    """Every dim of every tensor input dynamic (torch.export specialises what it must)."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError:
        return None

    def spec(v):
        if isinstance(v, torch.Tensor):
            return {d: torch.export.Dim.AUTO for d in range(v.dim())} or None
        if isinstance(v, (list, tuple)):
            return type(v)(spec(x) for x in v)
        if isinstance(v, dict):
            return {k: spec(x) for k, x in v.items()}
        return None
    return {k: spec(v) for k, v in bound.items()}


def _register_output_dataclasses(model, args, kwargs) -> None:
    """torch.export needs pytree nodes for output containers: register plain dataclasses
    (transformers' ModelOutput registers itself)."""
    import dataclasses
    import torch.utils._pytree as pytree
    with torch.no_grad():
        out = model(*args, **kwargs)
    seen, stack = set(), [out]
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif dataclasses.is_dataclass(v) and not isinstance(v, type) and type(v) not in seen:
            seen.add(type(v))
            if type(v) not in pytree.SUPPORTED_NODES:
                pytree.register_dataclass(type(v))
            stack.extend(getattr(v, f.name) for f in dataclasses.fields(v))


def _batch_of_two(x):
    """Inputs with batch 1 doubled: torch.export would specialise a size-1 batch."""
    return map_tensors(x, lambda t: torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t)


class _GraphDumpFilter:
    """sys.stderr without the partial graphs torch.export prints when an export fails."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        return len(text) if "def forward(self" in text else self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def without_graph_dumps():
    """torch.export prints the whole partial graph of a failed export to stderr (hundreds of
    lines on a detector). Capture and export try several ways and say in one line why one
    failed, so that dump is noise; everything else written to stderr passes."""
    was = sys.stderr
    sys.stderr = _GraphDumpFilter(was)
    try:
        yield
    finally:
        sys.stderr = was


def _export_capture(model, args, kwargs, is_leaf) -> tuple[fx.GraphModule, dict, str]:
    quiet = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch._dynamo",
                                            "torch.fx.experimental.symbolic_shapes", "torch._subclasses")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.CRITICAL)
    was = model.training
    model.eval()  # captured in eval mode; layers folded back into modules keep their train()
    try:
        with warnings.catch_warnings(), without_graph_dumps():
            warnings.simplefilter("ignore")
            _register_output_dataclasses(model, args, kwargs)
            a2, k2 = unmarked(_batch_of_two(tuple(args))), unmarked(_batch_of_two(dict(kwargs)))
            why = ""
            try:
                ep = torch.export.export(model, a2, k2, strict=False, dynamic_shapes=_dynamic_shapes(model, a2, k2))
            except Exception as e:  # noqa: BLE001
                if "data-dependent" in str(e) or "GuardOnDataDependent" in type(e).__name__:
                    raise
                why = _why(e)  # every size is the dummy's from here on
                ep = torch.export.export(model, unmarked(tuple(args)), unmarked(dict(kwargs)), strict=False)
            fixed = _fixed_sizes(ep)
            if not why and any(0 in dims for dims in fixed.values()):  # non-strict len() fixes a size (Python needs
                # an int there); torch.export's strict (dynamo) mode keeps len() symbolic
                ep, fixed = _strict_if_freer(model, a2, k2, ep, fixed)
    except Exception as e:  # noqa: BLE001
        where = _user_frame(e)
        raise _FxFailed(_Failure("torch.export", None, where, _why(e, where), e)) from e
    finally:
        model.train(was)
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    um = ep.module()
    g = um.graph
    for node in list(g.nodes):  # dtype/device asserts go (the sim may move); shape guards
        # (_guards_fn: the branches taken at capture) stay: a batch they exclude raises
        if node.op == "call_function" and G._aten_key(node.target) == "_assert_tensor_metadata.default":
            g.erase_node(node)
    mods = dict(model.named_modules())
    _fold_recurrent(g, mods)
    _fold_modules(g, mods, lambda path, m: is_leaf(path, m) and not isinstance(m, _RNN_BASES))
    root = {}
    for node in g.nodes:
        if node.op == "get_attr":
            root[node.target] = _resolve(model, node.target, um)
        elif node.op == "call_module":
            root[node.target] = mods[node.target] if node.target in mods else um.get_submodule(node.target)
    gm = fx.GraphModule(root, g, model.__class__.__name__)
    gm.training = model.training  # a dict root leaves it True; the modules keep their own mode
    for attr in ("_in_spec", "_out_spec"):  # the pytree codegen reads them
        if hasattr(um, attr):
            setattr(gm, attr, getattr(um, attr))
    gm.graph.eliminate_dead_code()  # parameters of folded modules
    _delete_unused_submodules(gm)
    gm.recompile()
    return gm, fixed, why


def _strict_if_freer(model, args, kwargs, ep, fixed):
    """The strict-mode export when it succeeds and fixes fewer input sizes, else (ep, fixed)."""
    try:
        strict = torch.export.export(model, args, kwargs, strict=True,
                                     dynamic_shapes=_dynamic_shapes(model, args, kwargs))
    except Exception:  # noqa: BLE001 - dynamo cannot trace it: keep the non-strict capture
        return ep, fixed
    strict_fixed = _fixed_sizes(strict)
    count = lambda f: sum(len(d) for d in f.values())  # noqa: E731
    return (strict, strict_fixed) if count(strict_fixed) < count(fixed) else (ep, fixed)


def _fixed_sizes(ep) -> dict:
    """{input name: {dim: size}} of the input dims the exported program holds constant
    (every dim was asked to stay free; torch.export fixes what the model's code needs as a
    Python number, e.g. ``len(points)``, and guards it)."""
    user = set(ep.graph_signature.user_inputs)
    out = {}
    for node in ep.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" and node.name in user else None
        if isinstance(val, torch.Tensor):
            dims = {d: int(n) for d, n in enumerate(val.shape)  # a specialised SymInt's expression is a number
                    if not isinstance(n, torch.SymInt) or n.node.expr.is_number}
            if dims:
                out[node.name] = dims
    return out


def _resolve(model: nn.Module, target: str, fallback: nn.Module):
    try:
        return _attr(model, target)
    except AttributeError:
        return _attr(fallback, target)


def _owner(node, mods, is_leaf) -> str | None:
    """The outermost leaf module in node's module stack (export records it per node)."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        path = re.sub(r"@\d+$", "", path)
        m = mods.get(path)
        if path and m is not None and is_leaf(path, m):
            return path
    return None


def _fold_modules(g: fx.Graph, mods: dict, is_leaf) -> None:
    """Fold each call of a leaf module (a run of its aten nodes with one tensor input and one
    output) back into one call_module node under the module's own name."""
    runs, cur = [], None
    for node in g.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        path = _owner(node, mods, is_leaf)
        if path is None:
            cur = None
            continue
        if cur is None or cur[0] != path:
            cur = (path, [])
            runs.append(cur)
        cur[1].append(node)
    for path, nodes in runs:
        _fold_run(g, path, nodes)


# aten ops that torch's recurrent modules call (torch._VF): op -> what it returns
_RNN_BASES = (nn.RNNBase, nn.RNNCellBase)  # every torch recurrent module; those with a twin: recurrent.RECURRENT
_RECURRENT_OPS = {"lstm.input": "out, h, c", "gru.input": "out, h", "rnn_tanh.input": "out, h",
                  "rnn_relu.input": "out, h", "lstm_cell.default": "h, c", "gru_cell.default": "h",
                  "rnn_tanh_cell.default": "h", "rnn_relu_cell.default": "h"}


def _fold_recurrent(g: fx.Graph, mods: dict) -> None:
    """Turn each aten recurrent op (aten.lstm, aten.gru_cell, ...) back into a call of its
    module with the same input and states, so QuantSim puts the quantized twin there.

    An LSTM call takes the input and two states and returns three tensors, so the generic
    one-input fold cannot take it; left as an aten op its gate matrices would stay float.
    The op receives exactly what the module's forward would pass on for a batched input
    with explicit states, so the module called that way computes the same values; zeros
    states and unbatched reshapes the module made stay in the graph around it."""
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        returns = _RECURRENT_OPS.get(G._aten_key(node.target))
        path = _recurrent_owner(node, mods) if returns else None
        if path is None:
            continue
        cell = not returns.startswith("out")
        weights = node.args[2:] if cell else node.args[2]
        if not all(w is None or isinstance(w, fx.Node) and w.op == "get_attr" and w.target.startswith(path + ".")
                   for w in weights):
            continue  # weights that are not the module's own: leave the op as it is
        x, hx = node.args[0], node.args[1]
        states = tuple(hx) if isinstance(hx, (list, tuple)) else hx
        with g.inserting_before(node):
            new = g.call_module(path, (x, states))
        val = node.meta.get("val")
        if returns == "out, h, c":  # the module returns (out, (h, c))
            with g.inserting_after(new):  # each after the one before: new, out, hc, h, c
                out = g.call_function(operator.getitem, (new, 0))
            with g.inserting_after(out):
                hc = g.call_function(operator.getitem, (new, 1))
            with g.inserting_after(hc):
                h = g.call_function(operator.getitem, (hc, 0))
            with g.inserting_after(h):
                c = g.call_function(operator.getitem, (hc, 1))
            if val is not None:
                new.meta["val"] = (val[0], (val[1], val[2]))
                hc.meta["val"] = (val[1], val[2])
                for i, n in enumerate((out, h, c)):
                    n.meta["val"] = val[i]
            for u in list(node.users):
                if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int):
                    u.replace_all_uses_with((out, h, c)[u.args[1]])
                    g.erase_node(u)
            if node.users:  # the tuple itself used whole (rare): rebuild it
                with g.inserting_after(c):
                    whole = g.call_function(tuple, ([out, h, c],))
                node.replace_all_uses_with(whole)
            made = (new, out, hc, h, c)
        else:  # same structure as the module's return
            if val is not None:
                new.meta["val"] = val
            node.replace_all_uses_with(new)
            made = (new,)
        for n in made:  # a leaf module around the recurrent one still sees these as its own
            for key in ("nn_module_stack", "stack_trace"):
                if key in node.meta:
                    n.meta[key] = node.meta[key]
        g.erase_node(node)


def _recurrent_owner(node, mods) -> str | None:
    """The innermost recurrent module in node's module stack that has a quantized twin
    (nn.RNN and an LSTM with proj_size have none: their op stays as it is)."""
    found = None
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        path = re.sub(r"@\d+$", "", path)
        m = mods.get(path)
        if isinstance(m, _RNN_BASES) and G.twin_factory(m) is not None:
            found = path
    return found


def _is_tensor(n) -> bool:
    return n.op == "get_attr" or isinstance(n.meta.get("val"), torch.Tensor)


def _fold_run(g: fx.Graph, path: str, nodes: list) -> None:
    # symbolic sizes stay in the graph (others may use them); they must not read the inside
    inside = {n for n in nodes if _is_tensor(n)}
    for n in nodes:
        if n not in inside and any(a in inside for a in n.all_input_nodes):
            return
    ext = []
    for n in nodes:
        if n not in inside:
            continue
        for a in n.all_input_nodes:
            if a in inside or a in ext or not _is_tensor(a):
                continue
            if a.op == "get_attr" and a.target.startswith(path + "."):
                continue  # the module's own parameters and buffers
            ext.append(a)
    outs = [n for n in inside if any(u not in inside for u in n.users)]
    if len(ext) != 1 or len(outs) != 1 or ext[0].op == "get_attr":
        return  # not a plain one-input call: its ops stay in the graph
    with g.inserting_after(outs[0]):
        new = g.create_node("call_module", path, (ext[0],), {})
    new.meta.update(outs[0].meta)
    outs[0].replace_all_uses_with(new, delete_user_cb=lambda u: u not in inside)
    for n in reversed(nodes):
        if n in inside:
            g.erase_node(n)


# ------------------------------------------------------------------ entry point
def capture(model: nn.Module, args: tuple, kwargs: dict, *, leaf_types=(), leaf_names=(),
            concrete_args=None, strict: bool = False, method: str = "auto") -> Captured:
    """Capture model for QuantSim (see the module docstring for the order of attempts)."""
    if method not in ("auto", "fx", "export"):
        raise ValueError(f"capture method must be 'auto', 'fx' or 'export' (got {method!r})")
    leaf_types, leaf_names = tuple(leaf_types), set(leaf_names)

    def is_leaf(path, m):
        return (path in leaf_names or isinstance(m, leaf_types) or G.is_known_leaf(m)
                or G.is_float_leaf(m))

    notes, failures = [], []
    if method in ("auto", "fx"):
        try:
            gm = _fx_capture(model, args, kwargs, leaf_types, leaf_names, concrete_args)
            return _finish(gm, "torch.fx", {}, notes)
        except _FxFailed as f:
            failures.append(f.failure)
            notes.append(f"torch.fx failed: {f.failure.describe()}")
    if method in ("auto", "export"):
        if concrete_args:
            kwargs = {**kwargs, **{k: v for k, v in concrete_args.items() if k not in kwargs}}
        try:
            gm, fixed, why = _export_capture(model, args, kwargs, is_leaf)
            cap = _finish(gm, "torch.export", {}, notes)
            cap.fixed_sizes, cap.fixed_why = fixed, why
            return cap
        except _FxFailed as f:
            failures.append(f.failure)
            notes.append(f"torch.export failed: {f.failure.describe()}")
    if not strict and method == "auto":
        try:
            gm, leaves = _fx_with_float_leaves(model, args, kwargs, leaf_types, leaf_names, concrete_args)
            return _finish(gm, "torch.fx", leaves, notes)
        except _FxFailed:
            pass
    raise G.TraceError(_failure_message(failures, strict)) from None


def _finish(gm, method, float_leaves, notes) -> Captured:
    decompose_attention(gm)
    names = tuple(n.target for n in gm.graph.nodes if n.op == "placeholder")
    return Captured(gm, method, float_leaves, names, notes)


def _failure_message(failures: list[_Failure], strict: bool) -> str:
    lines = ["QuantSim could not capture the model:"]
    lines += [f"  {f.describe()}" for f in failures]
    module = next((f.module for f in failures if f.module), None)
    todo = ["What to do: make the branch independent of tensor values (torch.where, or compute it "
            "from shapes), or fix the input-dependent arguments with QuantSim(..., concrete_args={...})"]
    if module:
        todo.append(f"or keep that module whole in float with QuantSim(..., leaf_modules=['{module}']) "
                    "(its output is quantized, its inside stays float)")
        if strict:
            todo.append("or drop QuantSimConfig(strict=True) to let QuantSim do that itself")
    return "\n".join(lines) + "\n" + ",\n".join(todo) + "."


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The values of gm's placeholders for a call gm(*args, **kwargs)."""
    if hasattr(gm, "_in_spec"):
        from torch.fx import _pytree as fx_pytree
        return list(fx_pytree.tree_flatten_spec((list(args), kwargs), gm._in_spec))
    out, pos = [], list(args)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if pos:
            out.append(pos.pop(0))
        elif node.target in kwargs:
            out.append(kwargs[node.target])
        else:
            out.append(node.args[0] if node.args else None)
    return out


def value_kinds(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict:
    """node -> 'float' | 'int' (non-float tensor) | 'other', from one run on the dummy input.
    Each tensor-valued node's shape on that run is left in ``node.meta["rq_shape"]``, and small
    integer values (shape arithmetic) in ``node.meta["rq_const"]``."""
    kinds = {}

    class _Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            kinds[n] = ("float" if out.is_floating_point() else "int") if isinstance(out, torch.Tensor) else "other"
            if isinstance(out, torch.Tensor):
                n.meta["rq_shape"] = tuple(out.shape)
            n.meta.pop("rq_const", None)
            if _shape_arithmetic(n, out):
                n.meta["rq_const"] = out
            return out
            return out
    with torch.no_grad():
        _Rec(gm).run(*flat_inputs(gm, args, kwargs))
    return kinds


_METADATA_METHODS = {"size", "dim", "numel", "ndimension", "nelement"}
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}


def _reads_metadata(n: fx.Node) -> bool:
    """A read of a tensor's size, rank, dtype or device (not of its values)."""
    if n.op == "call_method":
        return n.target in _METADATA_METHODS
    if n.op == "call_function":
        if n.target is getattr:
            return len(n.args) > 1 and n.args[1] in _METADATA_ATTRS
        return n.target in (torch.numel,) or str(n.target).split(".")[-2:-1] in (["sym_size"], ["sym_numel"])
    return False


def _shape_arithmetic(n: fx.Node, out) -> bool:
    """n computes a small integer value (or a size, dtype, device) from tensor metadata and
    constants only: the same for every input of the capture's shapes. Integers derived from
    values (an argmax, a count of non-zeros) are not."""
    small = (isinstance(out, torch.Tensor) and not out.is_floating_point() and out.numel() <= 64) or \
        isinstance(out, (int, torch.Size, torch.dtype, torch.device, str, type(None))) or \
        isinstance(out, (tuple, list)) and len(out) <= 64 and all(isinstance(v, int) for v in out)
    if not small or n.op == "placeholder":
        return False
    return _reads_metadata(n) or all(a.op == "get_attr" or "rq_const" in a.meta for a in n.all_input_nodes)


def mask_nodes(gm: fx.GraphModule, kinds: dict) -> tuple[set, set]:
    """(constant nodes, mask-derived nodes). A node is constant when no float model input
    reaches it except through parameters' own arithmetic, sizes and shapes: integer inputs
    (token ids, masks), parameters, buffers, factories, and the small integer values the
    capture's run recorded (``rq_const``: a detector's anchor grid built from feature-map
    sizes); a module fed only by constants (ConstantOfShape) too, unless by the ids (an
    Embedding). Mask-derived: constant, derived from a model input, and float (an additive
    attention mask built from the integer mask)."""
    const, from_input = set(), set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if kinds.get(n) != "float":
                const.add(n)
                from_input.add(n)
        elif n.op == "get_attr":
            const.add(n)
        elif n.op in ("call_function", "call_method", "call_module"):
            ins = n.all_input_nodes
            if n.op == "call_function" and G.function_op_type(n.target) == "Gather":
                continue  # an embedding lookup makes activations from ids
            ids = any(a in from_input for a in ins)
            if n.op == "call_module" and ids:
                continue  # a module on the ids (an Embedding) makes activations
            # shape arithmetic (x.shape[2], a grid size) is the same for every input of that shape
            if "rq_const" in n.meta or all(a in const for a in ins):
                const.add(n)
                if ids:
                    from_input.add(n)
    masks = {n for n in from_input if kinds.get(n) == "float"}
    return const, masks

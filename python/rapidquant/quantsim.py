"""QuantSim: simulate quantization of a model, calibrate it, save/load encodings, export."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from rapidquant import distributed as D
from rapidquant import graph as G
from rapidquant import cancellation
from rapidquant import recurrent as R  # LSTM/GRU(Cell) twins
from rapidquant.batches import (InputSignature, call_model, cast_floats, count_inputs, model_float_dtype, split_batch,
                                tensors, to_device)
from rapidquant.capture import capture, mask_nodes, value_kinds
from rapidquant.config import HwConfig, QuantSimConfig
from rapidquant.decomposed import fused_nodes
from rapidquant.int32_bias import fit_int32_biases
from rapidquant.progress import progress
from rapidquant.qmodules import FunctionalOp, InputQuantizer, QuantizedModule, QuantizedParameter
from rapidquant.quantizer import Quantizer, apply_encoding_constraints
from rapidquant.modelcopy import bake_computed_weights, copy_model, has_computed_weights


class UnsupportedModuleError(TypeError):
    pass


for _cls in R.RECURRENT:  # LSTM/GRU(Cell): quantized twins from rapidquant.recurrent
    G.register_twin(_cls, R.quantized_twin, R.has_twin)

_tensors = tensors          # old private names, kept for other modules
_count_inputs = count_inputs
COLLAPSE_WARN = 0.9  # share of (not exactly representable) calibration values on one grid level
CLIP_WARN = 0.05     # share of calibration values outside the grid
# median relative rounding error of the non-zero calibration values: healthy 8-bit activation
# grids measure 0.01-0.05 (the coverage suite's classifiers at most 0.16); a residual stream
# whose outliers set the range, a power spectrum, a detector's near-empty score map 0.3-1 (the
# typical value rounds to zero). The bound doubles per bit below 8 (a healthy grid's error
# does): there only collapse is said.
REL_ERROR_WARN = 0.2
WIDEN_FROM_BITS = 8  # grids this wide that destroy their data are a range problem, not a
# precision the user chose: those are raised; narrower ones (W4A4) are only warned about


def destroys(d: dict, bitwidth: int) -> bool:
    """Whether a grid_damage record says the grid destroys its data (clipping aside)."""
    return d["collapsed"] >= COLLAPSE_WARN or d["rel_error"] >= REL_ERROR_WARN * 2 ** max(0, 8 - bitwidth)


_WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "Gather": 0}  # op type -> weight arg index


def _weight_operands(node: fx.Node, op_type: str) -> list:
    """(position, node) of the operands of a functional op that may be weights: both of a
    matmul, every einsum operand (``einsum(eq, *ops)`` or aten's ``einsum(eq, [ops])``),
    the weight argument of a conv, linear or embedding."""
    if op_type == "Einsum":
        ops = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        pairs = list(enumerate(ops, 1))
    else:
        # F.embedding(ids, weight) takes its table second, aten's embedding(weight, ids) first
        idx = (0, 1) if op_type == "MatMul" else (1,) if node.target is F.embedding else (_WEIGHT_OPS[op_type],)
        pairs = [(i, node.args[i]) for i in idx if i < len(node.args)]
    return [(i, a) for i, a in pairs if isinstance(a, fx.Node)]


def _warn_fixed_first_dims(fixed: dict, why: str) -> None:
    first = {name: dims[0] for name, dims in fixed.items() if 0 in dims}
    if first and why:
        warnings.warn(f"torch.export could not capture the model with free input sizes ({why}), so the sim and "
                      "its ONNX file take only the dummy input's shapes: " + ", ".join(
                          f"{k}: {tuple(d.values())}" for k, d in fixed.items()) + " (sim.fixed_input_sizes)",
                      stacklevel=3)
    elif first:
        warnings.warn("torch.export could not keep the first dimension of these inputs free and fixed it to the "
                      "dummy input's size: " + ", ".join(f"{k}: {v}" for k, v in first.items()) + ". The model's "
                      "code uses that size as a Python number (a loop over it, len(), int()), so the sim and its "
                      "ONNX file take only that size: calibrate and evaluate with inputs of it, or write that "
                      "code with tensor ops (sim.fixed_input_sizes lists every fixed dimension).", stacklevel=3)


def _explain_guard(error: BaseException, fixed: dict) -> BaseException:
    """A batch that fails a shape guard of the captured graph: say which sizes it may have."""
    if not (isinstance(error, AssertionError) and str(error).startswith("Guard failed") and fixed):
        return error
    sizes = "; ".join(f"{k}: " + ", ".join(f"dim {d} = {n}" for d, n in dims.items()) for k, dims in fixed.items())
    explained = ValueError(f"a calibration batch does not have the input sizes the captured model was fixed to "
                           f"({error}). torch.export fixed these (every other dimension may vary): {sizes}. "
                           "Give batches of those sizes, or write the code that needs them as Python numbers "
                           "with tensor ops.")
    explained.__cause__ = error
    return explained


class QuantSim:
    """Wrap a model so that its inputs, op outputs and parameters pass through quantizers.

    ``sim.model`` is an ordinary ``nn.Module`` (a ``torch.fx.GraphModule``): quantized
    modules keep their names, functional ops become named modules (``add``, ``matmul_1``,
    ...), and every quantizer is reachable by name through :meth:`quantizers` or as an
    attribute (``sim.model.conv1.param_quantizers["weight"]``,
    ``sim.model.conv1.output_quantizer``).

    ``dummy_input`` is a tensor, a tuple of positional inputs, a dict of keyword inputs
    (a tokenizer's output) or an ``(args, kwargs)`` pair. The model is captured with
    torch.fx, else torch.export (``capture_method`` says which); modules that neither can
    capture stay whole in float with their output quantized (``float_leaves``, with the
    reason; an error under ``QuantSimConfig(strict=True)``).
    """

    def __init__(self, model: nn.Module, dummy_input, config: QuantSimConfig | None = None, *,
                 inplace: bool = False, leaf_modules: Iterable = (), concrete_args: dict | None = None):
        self.config = config or QuantSimConfig()
        self.hw = HwConfig.load(self.config.hw_config)
        # an fp16/bf16 model takes fp32 inputs as its data loader gives them (cast here and in calibration)
        dummy_input = self.dummy_input = cast_floats(dummy_input, model_float_dtype(model, strict=False))
        device = _model_device(model)
        for t in tensors(dummy_input):
            if device is not None and t.device != device:
                raise ValueError(f"dummy_input is on {t.device} but the model is on {device}; "
                                 f"move it with .to({str(device)!r})")
        args, kwargs = split_batch(dummy_input)
        src = model if inplace else copy_model(model)
        self._inplace = inplace
        # computed weights (weight_norm, spectral_norm) as plain parameters: quantized as weights
        self.baked_weights: list[str] = [] if inplace else bake_computed_weights(src)
        if inplace and has_computed_weights(model):
            warnings.warn("inplace=True leaves the model's computed weights (weight_norm, spectral_norm) as they "
                          "are: their layers' weights stay float (named below); without inplace the sim holds "
                          "them as plain parameters and quantizes them", stacklevel=2)
        leaf_modules = tuple(leaf_modules)
        excluded = set(self.config.exclude)
        leaf_types = tuple(t for t in (*leaf_modules, *excluded) if isinstance(t, type))
        leaf_names = [n for n in (*leaf_modules, *excluded) if isinstance(n, str)]
        cap = capture(src, args, kwargs, leaf_types=leaf_types, leaf_names=leaf_names,
                      concrete_args=concrete_args, strict=self.config.strict, method=self.config.capture)
        self.model = cap.gm
        self.capture_method = cap.method
        self.capture_notes = cap.notes
        self.fixed_input_sizes: dict[str, dict] = dict(cap.fixed_sizes)  # torch.export: input -> {dim: size}
        _warn_fixed_first_dims(self.fixed_input_sizes, cap.fixed_why)
        self.input_signature = InputSignature(cap.input_names, len(args), tuple(kwargs))
        self.float_leaves: dict[str, str] = dict(cap.float_leaves)
        self.calibration_warnings: list[dict] = []
        self.widened: dict[str, str] = {}  # activation quantizers given more bits than the config says (why)
        # weight scales widened so their layer's int32 bias fits (rapidquant.int32_bias), and the
        # layers whose frozen weight encoding leaves the bias saturated
        self.bias_fits: dict = {}
        self.saturated_biases: dict[str, str] = {}
        self.bias_warned: set = set()  # (kind, layer) already warned about by rapidquant.int32_bias
        self.bias_fit_history: dict = {}  # weight quantizer -> every BiasFit made (rapidquant.int32_bias)
        self.float_weights: dict[str, str] = {}  # weights no quantizer reaches -> the op that reads them
        self.weight_buffers: list[str] = []  # float buffers read as weights, held as frozen parameters
        # input name -> {dim: sizes} the calibration batches had: a dim seen at two sizes is exported symbolic
        self.calibration_sizes: dict[str, dict[int, set]] = {}
        self.spelled_ops: dict[str, str] = {}  # node -> 'HardSwish', 'LayerNormalization': arithmetic quantized as one op
        self._build(cap.gm, excluded, args, kwargs)
        for m in self.model.modules():  # recurrent twins' internals built wider than the act bitwidth
            if isinstance(m, R.RECURRENT_TWINS):
                self.widened.update(m.raised)
        self._check_runs(dummy_input)

    @property
    def n_inputs(self) -> int:
        """Number of model inputs (``input_signature`` has their names)."""
        return len(self.input_signature.names)


    # ------------------------------------------------------------------ construction
    def default_bitwidths(self) -> tuple[int, int]:
        """(param, activation) bitwidths new quantizers get: the config's, else the hw config's, else 8."""
        c = self.config
        k = self.hw.default_bitwidths() or {}
        pbw = c.param_bw or k.get("param", {}).get("bitwidth", 8)
        abw = c.act_bw or k.get("activation", {}).get("bitwidth", 8)
        return pbw, abw

    def _new_quantizer(self, name, *, param: bool, op_type: str, pname: str = "", axis=None,
                       block_size=None) -> Quantizer:
        c, hw = self.config, self.hw
        pbw, abw = self.default_bitwidths()
        dtype = c.dtype if param else (c.act_dtype or c.dtype)
        if param:
            sym = c.param_symmetric if c.param_symmetric is not None else hw.param_symmetric(op_type, pname)
        else:
            sym = c.act_symmetric if c.act_symmetric is not None else hw.act_symmetric(op_type)
        signed = True if (param and sym) else (False if not sym else not hw.unsigned_symmetric())
        return Quantizer(
            bitwidth=pbw if param else abw, symmetric=sym, signed=signed, axis=axis,
            block_size=block_size, scheme=c.param_scheme if param else c.act_scheme,
            percentile=c.percentile, gamma=c.sqnr_gamma, dtype=dtype,
            float_format=c.float_format, learn_range=c.learn_range, name=name,
            bins=c.histogram_bins, nonfinite=c.nonfinite)

    def new_quantizer(self, name, *, param: bool, op_type: str, pname: str = "", axis=None,
                      block_size=None) -> Quantizer:
        """A quantizer that follows this sim's config and hw config (for quantized twins)."""
        return self._new_quantizer(name, param=param, op_type=op_type, pname=pname, axis=axis,
                                   block_size=block_size)

    def _build(self, gm: fx.GraphModule, excluded: set, args: tuple, kwargs: dict) -> None:
        kinds = value_kinds(gm, args, kwargs)
        infos, unsupported, unknown = G.classify(gm, excluded, kinds)
        self._check_float_leaves(infos)
        if unknown:
            warnings.warn("QuantSim leaves the outputs of these functions unquantized (unknown ops): "
                          + ", ".join(unknown) + ". Teach it with rapidquant.register_function(fn, op_type).",
                          stacklevel=3)
        const, masks = mask_nodes(gm, kinds)
        self._quantize_used_params(gm, infos)
        fused, self.spelled_ops = fused_nodes(gm, infos, self.hw.supergroups())
        by_node = {i.node: i for i in infos}
        outputs = _output_nodes(gm)
        out_q = self.hw.model_output_quantized()
        c = self.config
        g = gm.graph
        no_blocks: list[str] = []
        for info in infos:
            node = info.node
            if info.op_type is None or info.passthrough:
                continue
            quantize_out = self.hw.output_quantized(info.op_type) and node not in fused
            if node in outputs and out_q is not None:
                quantize_out = out_q
            if node.op == "call_module":
                name = node.target
                if info.twin is not None:  # e.g. LSTM/GRU: its own quantized implementation
                    gm.set_submodule(name, info.twin(info.module, name, self._new_quantizer, self.hw, c))
                    continue
                pq = {}
                for pname, axis in (info.spec.params.items() if info.spec else ()):
                    try:
                        p = info.module.get_parameter(pname)
                    except AttributeError:
                        continue
                    if p is None or not self.hw.param_quantized(info.op_type, _param_kind(pname)):
                        continue
                    per_ch = c.per_channel if c.per_channel is not None else self.hw.per_channel(info.op_type)
                    use_axis = axis if (per_ch and axis is not None) else None
                    block = None
                    if c.block_size and pname == "weight" and axis == 0 and p.dim() >= 2:
                        if p.shape[1] % c.block_size:
                            no_blocks.append(f"{name} ({p.shape[1]} input channels)")
                            use_axis = 0
                        else:
                            block, use_axis = c.block_size, 0
                    pq[pname] = self._new_quantizer(f"{name}.{pname}", param=True, op_type=info.op_type,
                                                    pname=_param_kind(pname), axis=use_axis, block_size=block)
                if node in const and not _feeds_layer(node, by_node):
                    quantize_out = False  # a constant made by a module (ConstantOfShape): no activation
                oq = self._new_quantizer(f"{name}.output", param=False, op_type=info.op_type) if quantize_out else None
                if oq is not None:
                    apply_encoding_constraints(oq, self.hw.encoding_constraints(info.op_type))
                if not pq and oq is None:
                    continue
                gm.set_submodule(name, QuantizedModule(info.module, info.op_type, pq, oq))
            elif quantize_out and not (node in const and not _feeds_layer(node, by_node)) \
                    and not _applies_mask(node, info.op_type, masks):
                name = _unique_name(gm, node.name)
                oq = self._new_quantizer(f"{name}.output", param=False, op_type=info.op_type)
                apply_encoding_constraints(oq, self.hw.encoding_constraints(info.op_type))
                gm.add_submodule(name, FunctionalOp(node.op, node.target, info.op_type, oq))
                with g.inserting_after(node):
                    new = g.call_module(name, node.args, node.kwargs)
                new.meta.update(node.meta)
                node.replace_all_uses_with(new)
                g.erase_node(node)
        if no_blocks:
            warnings.warn(f"block_size {c.block_size} does not divide the input channels of "
                          + ", ".join(no_blocks) + "; those weights use per-channel encodings", stacklevel=3)
        if self.hw.model_input_quantized():
            for node in [n for n in g.nodes if n.op == "placeholder"]:
                if kinds.get(node) != "float":
                    continue  # integer inputs (token ids, masks) and constants are not quantized
                name = _unique_name(gm, f"input_{node.name}")
                gm.add_submodule(name, InputQuantizer(self._new_quantizer(f"{name}.output", param=False, op_type="Input")))
                with g.inserting_after(node):
                    new = g.call_module(name, (node,))
                node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        self._check_float_weights(gm, excluded)
        g.lint()
        gm.recompile()
        _link_bias_inputs(gm)

    def _check_float_leaves(self, infos) -> None:
        """Modules with no quantized version stay whole in float (output quantized): one
        warning, listed in ``float_leaves``; an error under strict mode."""
        for info in infos:
            if info.float_leaf and info.node.target not in self.float_leaves:
                m = info.module
                self.float_leaves[info.node.target] = (
                    f"no quantized version of {type(m).__module__}.{type(m).__name__}")
        if not self.float_leaves:
            return
        listed = "\n  ".join(f"{k}: {v}" for k, v in self.float_leaves.items())
        if self.config.strict:
            raise UnsupportedModuleError(
                "QuantSim has no quantized version of these modules (strict=True):\n  " + listed +
                "\nRegister one with rapidquant.register_module(cls, op_type, params={'weight': axis}), "
                "leave them in float with QuantSimConfig(exclude=(cls_or_name, ...)), or drop strict=True "
                "to keep them whole in float with their outputs quantized.")
        warnings.warn(f"QuantSim keeps {len(self.float_leaves)} modules whole in float (their outputs are "
                      "quantized, their insides are not):\n  " + listed +
                      "\nSee sim.float_leaves; QuantSimConfig(strict=True) makes this an error.", stacklevel=4)

    def _check_float_weights(self, gm: fx.GraphModule, excluded: set) -> None:
        """Name every matrix-shaped parameter the graph reads raw (an op QuantSim does not
        know that takes weights): it would run in float in the sim and the file alike."""
        if not self.hw.param_quantized("MatMul", "weight"):
            return  # a hardware config that quantizes no weights
        mods = dict(gm.named_modules())
        skip = [e for e in excluded if isinstance(e, str)]

        def readers(n):  # the ops that use n's value, looking through reshapes and views
            for u in n.users:
                shape_only = (u.op == "call_function" and G.is_passthrough_function(u.target)) or \
                    (u.op == "call_method" and u.target in G.PASSTHROUGH_METHODS)
                yield from (readers(u) if shape_only else [u])

        def op_type(u):
            return getattr(mods.get(u.target), "op_type", None) if u.op == "call_module" else \
                (G.function_op_type(u.target) if u.op == "call_function" else None)

        for node in gm.graph.nodes:
            if node.op != "get_attr" or any(node.target == e or node.target.startswith(e + ".") for e in skip):
                continue
            try:
                p = gm.get_parameter(node.target)
            except AttributeError:
                try:  # a buffer read as a weight: left float only under inplace=True
                    p = gm.get_buffer(node.target)
                except AttributeError:
                    continue  # a constant
            if p.dim() < 2 or not p.is_floating_point():
                continue
            raw = [u for u in readers(node)  # an operand of an add/concat (a positional embedding) is no weight
                   if not (u.op == "call_module" and isinstance(mods.get(u.target), QuantizedParameter))
                   and op_type(u) not in _OPERAND_OPS]
            if raw:
                self.float_weights[node.target] = ", ".join(sorted({_op_name(u) for u in raw}))
        if self.float_weights:
            listed = "\n  ".join(f"{k} (read by {v})" for k, v in self.float_weights.items())
            warnings.warn(f"QuantSim leaves {len(self.float_weights)} weights in float: no "
                          "weight quantizer reaches them through the ops that read them:\n  " + listed +
                          "\nSee sim.float_weights; teach the op with rapidquant.register_function(fn, op_type) "
                          "or wrap it in a module registered with rapidquant.register_module.", stacklevel=4)

    def _quantize_used_params(self, gm: fx.GraphModule, infos) -> None:
        """Give a weight quantizer to every parameter that a functional conv, linear, matmul,
        einsum or embedding uses directly (a Conv2d subclass's own forward, ``x @ self.w``; an
        einsum operand gets a per-tensor grid: which of its dims are outputs is the equation's)."""
        g, c = gm.graph, self.config
        done: dict = {}
        for info in infos:
            node = info.node
            if node.op != "call_function" or info.op_type not in (*_WEIGHT_OPS, "MatMul", "Einsum"):
                continue
            for i, arg in _weight_operands(node, info.op_type):
                src, direct = _param_source(arg)
                if src is None or src.target in done:
                    continue
                kind = "weight"
                if not self.hw.param_quantized(info.op_type, kind):
                    continue
                try:
                    p = gm.get_parameter(src.target)
                except AttributeError:
                    p = self._weight_buffer_as_parameter(gm, src.target)
                    if p is None:
                        continue  # a constant or an integer buffer: no weight
                per_ch = c.per_channel if c.per_channel is not None else self.hw.per_channel(info.op_type)
                axis = None
                if per_ch and direct and p.dim() >= 2:
                    axis = {"Conv": 0, "Gemm": 0, "ConvTranspose": 1}.get(info.op_type)
                    if info.op_type == "MatMul" and i == 1:
                        axis = p.dim() - 1  # x @ W: W's last dim indexes the outputs
                name = _unique_name(gm, src.target + "_quantizer")
                q = self._new_quantizer(src.target, param=True, op_type=info.op_type, pname=kind, axis=axis)
                gm.add_submodule(name, QuantizedParameter(q, src.target, info.op_type))
                with g.inserting_after(src):
                    new = g.call_module(name, (src,))
                src.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
                done[src.target] = new

    def _weight_buffer_as_parameter(self, gm: fx.GraphModule, target: str):
        """A float matrix held as a buffer that an op reads as its weight (onnx2torch keeps the
        ONNX initializers of MatMul, Einsum and Gather as buffers) becomes a frozen parameter
        of the sim's copy, so it is quantized as a weight. None for anything else, and under
        inplace=True: the user's own model is not changed (_check_float_weights names it)."""
        try:
            b = gm.get_buffer(target)
        except AttributeError:
            return None
        owner, _, attr = target.rpartition(".")
        module = gm.get_submodule(owner)
        if self._inplace or not b.is_floating_point() or b.dim() < 2 or attr not in module.state_dict(keep_vars=True):
            return None  # a non-persistent buffer as a parameter would add a state_dict key
        delattr(module, attr)
        p = nn.Parameter(b, requires_grad=False)
        module.register_parameter(attr, p)
        self.weight_buffers.append(target)
        return p

    def _check_runs(self, dummy_input) -> None:
        with self.disabled(), torch.no_grad():
            was = self.model.training
            self.model.eval()
            try:
                call_model(self.model, dummy_input, self.input_signature)
            finally:
                self.model.train(was)

    # ------------------------------------------------------------------ quantizer access
    def quantizers(self) -> "OrderedDict[str, Quantizer]":
        """All quantizers by name (``conv1.weight``, ``conv1.output``, ``add.output``, ``input_x.output``)."""
        return OrderedDict((q.name, q) for q in self.model.modules() if isinstance(q, Quantizer))

    def param_quantizers(self) -> "OrderedDict[str, Quantizer]":
        out = OrderedDict()
        for m in self.model.modules():
            if isinstance(m, QuantizedModule):
                for q in m.param_quantizers.values():
                    out[q.name] = q
            elif isinstance(m, QuantizedParameter):
                out[m.quantizer.name] = m.quantizer
        return out

    def parameters_quantized(self) -> "OrderedDict[str, torch.nn.Parameter]":
        """The float master parameter each parameter quantizer reads, by quantizer name."""
        out = OrderedDict()
        for m in self.model.modules():
            if isinstance(m, QuantizedModule):
                for key, q in m.param_quantizers.items():
                    out[q.name] = m.param(m.param_name(key))
            elif isinstance(m, QuantizedParameter):
                out[m.quantizer.name] = self.model.get_parameter(m.source)
        return out

    def activation_quantizers(self) -> "OrderedDict[str, Quantizer]":
        params = self.param_quantizers()
        return OrderedDict((n, q) for n, q in self.quantizers().items() if n not in params)

    def quantizer_parameters(self) -> list:
        """Learnable scales/zero points (QAT with learn_range=True): give them their own,
        smaller learning rate, e.g. Adam([{"params": weights, "lr": 1e-4},
        {"params": sim.quantizer_parameters(), "lr": 1e-5}])."""
        return [p for q in self.quantizers().values() for p in q.parameters()]

    def model_parameters(self) -> list:
        """The model's own (float master) parameters, without quantizer parameters and without
        the buffers held as parameters to quantize them as weights (constants of the model)."""
        ids = {id(p) for p in self.quantizer_parameters()}
        ids |= {id(self.model.get_parameter(n)) for n in self.weight_buffers}
        return [p for p in self.model.parameters() if id(p) not in ids]

    def quantizer(self, name: str) -> Quantizer:
        qs = self.quantizers()
        if name not in qs:
            raise KeyError(f"no quantizer named {name!r}; there are {len(qs)}, e.g. {list(qs)[:5]}")
        return qs[name]

    def qmodules(self):
        return [(n, m) for n, m in self.model.named_modules()
                if isinstance(m, (QuantizedModule, FunctionalOp, InputQuantizer))]

    @contextmanager
    def disabled(self, which: Callable[[Quantizer], bool] | None = None):
        """Temporarily disable (some) quantizers."""
        qs = [q for q in self.quantizers().values() if which is None or which(q)]
        before = [q.enabled for q in qs]
        for q in qs:
            q.enabled = False
            q.invalidate()
        try:
            yield self
        finally:
            for q, e in zip(qs, before):
                q.enabled = e
                q.invalidate()

    # ------------------------------------------------------------------ calibration
    def compute_encodings(self, data, num_batches: int | None = None, show_progress: bool = True,
                          shard: bool | None = None, sync: bool | None = None) -> None:
        """Calibrate: parameter encodings from the weights, activation encodings from data.

        ``data`` is an iterable of batches (tensor, tuple/list or dict; tuples longer than
        the model's inputs pass their first elements) or a callable ``data(model)`` that
        runs the forward passes itself. Activations pass through unquantized while their
        statistics accumulate; weights are already quantized.

        Under torch.distributed each rank calibrates every world_size-th batch and the
        statistics are combined, so all ranks get the same encodings as one process on the
        same data (min/max exactly; histogram schemes within about a bin). Pass
        ``shard=False`` when each rank's loader already yields its own shard, and
        ``sync=False`` for a purely local calibration (no collectives).
        """
        sync = D.active() if sync is None else (sync and D.active())
        shard = sync if shard is None else shard
        self._calibrate_weights()  # the int32 bias fit waits for the new activation encodings
        acts = [q for q in self.activation_quantizers().values()
                if q.enabled and not (q.frozen and q.is_initialized)]
        for q in acts:
            q.start_calibration()
        model = self.model
        was = model.training
        model.eval()
        device = _model_device(model)
        dtype = model_float_dtype(model, strict=False)  # an fp16 model calibrates on fp32 batches
        seen, error, cancelling = 0, None, {}
        try:
            with torch.no_grad(), cancellation.watch(self, cancelling):
                if callable(data) and not isinstance(data, (torch.utils.data.DataLoader, list, tuple)):
                    data(model)
                    seen = 1
                else:
                    total = num_batches
                    if total is None and hasattr(data, "__len__"):
                        total = len(data)
                    bar = progress(data, total=total, desc="calibrating", enabled=show_progress and D.is_main())
                    for i, batch in enumerate(bar):
                        if num_batches is not None and i >= num_batches:
                            break
                        self._note_sizes(batch)  # every rank notes every batch's sizes: one file
                        if shard and not D.mine(i):
                            continue  # another rank's batch
                        batch = cast_floats(to_device(batch, device) if device else batch, dtype)
                        call_model(model, batch, self.input_signature)
                        seen += 1
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = _explain_guard(e, self.fixed_input_sizes)
        finally:
            model.train(was)
        try:
            if sync:
                D.check_failures(error, "calibration")
                seen_t = torch.tensor([seen], dtype=torch.int64)
                D.all_reduce(seen_t)
                seen = int(seen_t)
            elif error is not None:
                raise error
            if seen == 0:
                raise ValueError("compute_encodings got no batches: the data loader is empty "
                                 "(or num_batches=0); pass at least one batch")
            if sync:
                D.sync_observer_stats(acts)
        except BaseException:
            for q in acts:
                q.observer = None
            raise
        unused = [q.name for q in acts if not q.finish_calibration()]
        if unused:
            for name in unused:
                self.quantizer(name).enabled = False
            warnings.warn(f"{len(unused)} quantizers saw no data during calibration and were disabled: "
                          + ", ".join(unused[:10]) + (" ..." if len(unused) > 10 else ""), stacklevel=2)
        self._check_grids(acts, sync)
        self._name_cancelling(cancelling)
        fit_int32_biases(self)

    def calibrate_params(self) -> None:
        """Parameter encodings from the current weights (no data needed; frozen ones kept),
        widened where a layer's int32 bias needs it (rapidquant.int32_bias)."""
        self._calibrate_weights()
        fit_int32_biases(self)  # the input encodings may be there already (a scheme or precision change)

    def _calibrate_weights(self) -> None:
        for m in self.model.modules():
            if isinstance(m, QuantizedModule):
                pairs = [(q, m.param(m.param_name(k))) for k, q in m.param_quantizers.items()]
            elif isinstance(m, QuantizedParameter):
                pairs = [(m.quantizer, self.model.get_parameter(m.source))]
            else:
                continue
            for q, p in pairs:
                if q.frozen and q.is_initialized:
                    continue
                if not torch.isfinite(p).all():
                    raise ValueError(f"parameter {q.name!r} contains NaN or Inf: its weight encoding is undefined; "
                                     "fix or exclude that layer (QuantSimConfig(exclude=...)) before quantizing")
                q.start_calibration()
                q.observer.update(p)
                q.finish_calibration()
            m.clear_cache()


    def run(self, batch):
        """Run the sim on one batch of any structure (tensor, tuple, dict, (args, kwargs));
        tuples longer than the inputs pass their first elements, dict keys the captured
        model does not take are dropped."""
        return call_model(self.model, batch, self.input_signature)

    def _check_grids(self, quantizers, sync: bool) -> None:
        """Name the quantizers whose grid destroys their calibration data (one warning), and
        raise destroyed integer activation grids of 8 or more bits to ``config.widen_destroyed``
        bits where the hardware config offers that many (clipping is left alone: more bits do
        not mend it)."""
        from rapidquant.calibration import grid_damage
        target = self.config.widen_destroyed
        if target is not None and not self.hw.runs_activation_bits(target):
            target = None  # the hardware runs no such activations
        measured, damage = {}, {}  # index -> grid_damage record; the ones worth a word
        for i, q in enumerate(quantizers):
            if not q.enabled or q.dtype != "int" or q.scale is None or q.stats is None or q.stats.sample is None:
                continue
            d = grid_damage(q.stats.sample, q.scale, q.zero_point, *q.qrange)
            if d is not None:
                measured[i] = {"name": q.name, "bitwidth": q.bitwidth, **d}
                if destroys(d, q.bitwidth) or d["clipped"] >= CLIP_WARN:
                    damage[i] = measured[i]
        # one flag per quantizer (the same list on every rank): widen where any rank says so
        flags = torch.tensor([float(i in damage and target is not None and not q.frozen
                                    and WIDEN_FROM_BITS <= q.bitwidth < target and destroys(damage[i], q.bitwidth))
                              for i, q in enumerate(quantizers)])
        if sync:
            D.all_reduce(flags, torch.distributed.ReduceOp.MAX)
        for i, (q, widen) in enumerate(zip(quantizers, flags.tolist())):
            if widen and i in measured:
                f = damage.setdefault(i, measured[i])  # may be another rank's data that said so
                q.set_precision("int", target)
                q.compute_encoding()
                after = grid_damage(q.stats.sample, q.scale, q.zero_point, *q.qrange)
                f.update(widened_to=target, rel_error_after=after["rel_error"] if after else 0.0)
                self.widened[q.name] = (f"{f['bitwidth']} -> {target} bits: median rounding error "
                                        f"{f['rel_error']:.0%} -> {f['rel_error_after']:.1%}")
        found = self.calibration_warnings = list(damage.values())
        if found:
            def line(f):
                s = (f"{f['name']}: the typical value is off by {f['rel_error']:.0%}, {f['collapsed']:.0%} "
                     f"round to one level ({f['level']:.3g}), {f['clipped']:.0%} are clipped")
                return s + (f"; raised to {f['widened_to']} bits" if "widened_to" in f else "")
            raised = [f for f in found if "widened_to" in f]
            warnings.warn(f"{len(found)} quantizers destroy most of their input at their bitwidth:\n  "
                          + "\n  ".join(line(f) for f in found)
                          + (f"\nRaised to {target} bits: {len(raised)} (sim.widened; "
                             "QuantSimConfig(widen_destroyed=None) keeps their bitwidth)." if raised else "")
                          + "\nOtherwise widen them (bitwidth 16), normalise or log-scale that tensor in the model, "
                          "or disable them (sim.quantizer(name).enabled = False). "
                          "Facts in sim.calibration_warnings.", stacklevel=3)

    def _name_cancelling(self, found: dict) -> None:
        """Add the layers whose bias cancels their output (rapidquant.cancellation; measured on
        the first calibration batch each saw, on this rank) to calibration_warnings, and warn."""
        if not found:
            return
        self.calibration_warnings += [{"name": n, "kind": "cancellation", **r} for n, r in found.items()]
        first = next(iter(found))
        warnings.warn(f"layers that compute a small difference of large numbers ({len(found)}): their weight "
                      "grid's rounding error is large against what they output:\n  "
                      + "\n  ".join(f"{n}: {cancellation.describe(r)}" for n, r in found.items())
                      + f"\nGive them more weight bits (sim.quantizer('{first}.weight').set_precision('int', 16)) "
                      "or keep them in float (QuantSimConfig(exclude=[...])). Facts in sim.calibration_warnings.",
                      stacklevel=3)

    # ------------------------------------------------------------------ encodings I/O
    def encodings(self) -> dict:
        """All encodings as plain data (the rapidquant format, keyed by quantizer name)."""
        return {name: q.encoding for name, q in self.quantizers().items()}

    def save_encodings(self, path: str, overwrite: bool = False) -> str:
        from rapidquant.export.encodings import write_rapidquant
        return write_rapidquant(self, path, overwrite=overwrite)

    def load_encodings(self, path_or_dict, freeze: bool = True, strict: bool = True, onnx_model=None):
        """Load encodings written by save_encodings or export, or by AIMET (0.6.1, 1.0.0, 2.0.0
        and ``_torch.encodings``; ``onnx_model``: the .onnx AIMET wrote with them, found beside
        the file by default). Quantizers the file does not list are disabled. Returns a
        report: which record went to which quantizer, which were derived copies, which
        matched nothing (an error under ``strict``), which quantizers were disabled."""
        from rapidquant.export.encodings import load_into
        report = load_into(self, path_or_dict, freeze=freeze, strict=strict, onnx_model=onnx_model)
        fit_int32_biases(self)
        return report

    def export(self, out_dir: str, dummy_input, filename: str = "model", *, encoding_format: str = "rapidquant",
               export_int32_bias: bool | str = True, overwrite: bool = False, opset: int | None = None,
               dynamic_batch: bool = True, unsigned_weights: bool = True, dynamic_dims: dict | None = None):
        """Write ``<filename>.onnx`` (QuantizeLinear/DequantizeLinear) and ``<filename>.encodings.json``.

        The graph carries the int32 biases the sim simulates (Conv/Linear layers whose
        input and weight are quantized, as onnxruntime and integer targets run them);
        ``export_int32_bias`` also lists them in the encodings file. The batch dimension is
        exported as symbolic when the model allows (``dynamic_batch``), and so are the dims the
        calibration batches had at different sizes (not with ``dynamic_batch=False``) and those
        ``dynamic_dims`` names
        (``{"audio": [2]}``: input name -> dims; a sequence length the calibration did not
        vary); a warning names any of them the model's code fixes. int8 weights of
        Conv/MatMul/Gemm layers with uint8 activations are written as uint8 with zero point
        + 128, the same grid: onnxruntime's int8-weight kernels saturate on x86 CPUs without
        VNNI; ``unsigned_weights=False`` keeps int8 for runtimes that require signed weights
        (TensorRT). Floating inputs are cast to an fp16/bf16 model's dtype. A weight grid too
        fine for its layer's int32 bias is widened first (rapidquant.int32_bias; warned)."""
        from rapidquant.export.onnx_qdq import export_sim
        dummy_input = cast_floats(dummy_input, model_float_dtype(self.model, strict=False))
        wanted = self.varying_dims() if dynamic_batch else {}  # dynamic_batch=False: static but what is named
        unknown = sorted(set(dynamic_dims or {}) - set(self.input_signature.names))
        if unknown:
            raise ValueError(f"dynamic_dims names {unknown}, which are not inputs of the captured model "
                             f"{list(self.input_signature.names)}")
        for name, dims in (dynamic_dims or {}).items():
            wanted[name] = sorted(set(wanted.get(name, [])) | {int(d) for d in dims})
        fit_int32_biases(self)  # encodings set by hand since calibration: the file must not clip a bias
        return export_sim(self, out_dir, self.positional(dummy_input), filename, encoding_format=encoding_format,
                          export_int32_bias=export_int32_bias, overwrite=overwrite, opset=opset,
                          dynamic_batch=dynamic_batch, unsigned_weights=unsigned_weights,
                          dynamic_dims=[wanted.get(n, []) for n in self.input_signature.names])

    def _note_sizes(self, batch) -> None:
        try:
            inputs = self.positional(batch)
        except ValueError:
            return  # call_model says what the batch lacks
        for name, t in zip(self.input_signature.names, inputs):
            if isinstance(t, torch.Tensor):
                dims = self.calibration_sizes.setdefault(name, {})
                for d, size in enumerate(t.shape):
                    dims.setdefault(d, set()).add(int(size))

    def varying_dims(self) -> dict[str, list[int]]:
        """Input name -> the dims beyond the batch the calibration batches had at more than one
        size (a sequence or time axis): exported symbolic with the batch."""
        varying = {n: [d for d, sizes in dims.items() if d > 0 and len(sizes) > 1]
                   for n, dims in self.calibration_sizes.items()}
        return {n: dims for n, dims in varying.items() if dims}

    def positional(self, batch) -> tuple:
        """A batch as the captured model's positional inputs, in signature order (dict
        batches by name): the form torch.onnx export and onnxruntime feeds take."""
        args, kwargs = split_batch(batch)
        names = self.input_signature.names
        if not kwargs:
            return tuple(args[:len(names)]) if len(args) > len(names) else tuple(args)
        rest = names[len(args):]
        missing = [n for n in rest if n not in kwargs]
        if missing:
            raise ValueError(f"batch lacks the model inputs {missing}; the sim was captured with {list(names)}")
        return tuple(args) + tuple(kwargs[n] for n in rest)

    def __repr__(self) -> str:
        qs = self.quantizers()
        on = sum(q.enabled for q in qs.values())
        extra = f", {len(self.float_leaves)} float leaves" if self.float_leaves else ""
        return (f"QuantSim({len(qs)} quantizers, {on} enabled, captured with {self.capture_method}{extra}, "
                f"config={self.config})")


# ops that move values without changing them: onnxruntime carries a DequantizeLinear's
# scale across their ONNX forms (MaxPool, Reshape, Transpose, Squeeze, Unsqueeze)
# getitem/narrow/select: slicing, which onnxruntime's QDQ propagation moves between Q and DQ (the
# layer then sees a DequantizeLinear input and onnxruntime quantizes its bias: the sim must too)
_VALUE_MOVING = {"flatten", "reshape", "view", "_unsafe_view", "squeeze", "unsqueeze", "permute", "transpose",
                 "contiguous", "max_pool1d", "max_pool2d", "max_pool3d", "dropout",  # dropout: gone in eval
                 "getitem", "narrow", "select"}
_VALUE_MOVING_MODULES = (nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Identity, nn.Dropout,
                         nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _link_bias_inputs(gm: fx.GraphModule) -> None:
    """Tell each Conv/Linear wrapper which quantizer produces its input (through ops that
    only move values), so that it simulates the int32 bias the deployed model uses."""
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        layer = gm.get_submodule(node.target)
        if not isinstance(layer, QuantizedModule) or type(layer.module) not in (
                nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear):
            continue
        n = node.args[0]
        while isinstance(n, fx.Node):
            if n.op == "call_module":
                mod = gm.get_submodule(n.target)
                q = getattr(mod, "output_quantizer", None)
                if isinstance(q, Quantizer):
                    layer.bias_input = (q,)
                    break
                if not isinstance(mod, _VALUE_MOVING_MODULES):
                    break
            elif n.op in ("call_function", "call_method"):
                name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
                if name.split(".")[0] not in _VALUE_MOVING:
                    break
            else:
                break
            n = n.args[0] if n.args else None


def _model_device(model: nn.Module):
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def _output_nodes(gm: fx.GraphModule) -> set:
    outs = set()
    for node in gm.graph.nodes:
        if node.op == "output":
            for a in node.all_input_nodes:
                outs.add(a)
    return outs


def _unique_name(gm: nn.Module, base: str) -> str:
    base = base.replace(".", "_")
    name, i = base, 1
    existing = dict(gm.named_modules())
    while name in existing or hasattr(gm, name):
        name = f"{base}_{i}"
        i += 1
    return name


# elementwise ops whose parameter operands are activations, not weights (their output is quantized)
_OPERAND_OPS = {"Add", "Sub", "Mul", "Div", "Concat", "Where", "Max", "Min"}


def _op_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _param_kind(pname: str) -> str:
    """Config name of a parameter: 'in_proj_bias' is a bias, 'out_proj.weight' a weight."""
    leaf = pname.split(".")[-1]
    return "bias" if leaf.endswith("bias") else ("weight" if leaf.endswith("weight") else leaf)


def _param_source(node: fx.Node):
    """(get_attr node, direct) behind node, looking through reshapes/transposes/casts."""
    hops = 0
    while node.op != "get_attr":
        if node.op == "call_function" and G.is_passthrough_function(node.target) or \
                node.op == "call_method" and node.target in G.PASSTHROUGH_METHODS:
            ins = node.all_input_nodes
            if len(ins) != 1:
                return None, False
            node, hops = ins[0], hops + 1
        else:
            return None, False
    return node, hops == 0


def _feeds_layer(node: fx.Node, by_node: dict) -> bool:
    """True when node's value reaches a conv/linear/matmul through data movement only: a
    constant-like tensor there is a layer input (a uint8 image scaled by 1/255), quantized;
    elsewhere (mask arithmetic, position ids) it stays exact."""
    stack, seen = [node], set()
    while stack:
        for u in stack.pop().users:
            info = by_node.get(u)
            if info is None or u in seen:
                continue
            seen.add(u)
            if info.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                return True
            if info.passthrough:
                stack.append(u)
    return False


def _applies_mask(node: fx.Node, op_type: str, masks: set) -> bool:
    """An Add/Sub of an additive attention mask built from the integer mask: its output
    holds dtype-min values that no grid can carry; the softmax after it is quantized."""
    return op_type in ("Add", "Sub") and any(a in masks for a in node.all_input_nodes)

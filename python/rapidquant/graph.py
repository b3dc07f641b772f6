"""Graph capture for QuantSim: torch.fx tracing and the op vocabulary (ONNX op types).

Modules are classified by type, functions and tensor methods by target. Every op gets
an ONNX op type name, which is what hardware configs (AIMET's schema) speak.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn


@dataclass(frozen=True)
class ModuleSpec:
    """How QuantSim treats a module type: its ONNX op type and quantizable params (name -> channel axis)."""
    op_type: str
    params: dict = field(default_factory=dict)
    passthrough: bool = False  # only moves data: outputs stay on the input's grid


_CONV = {"weight": 0, "bias": 0}
MODULES: dict[type, ModuleSpec] = {
    nn.Conv1d: ModuleSpec("Conv", _CONV), nn.Conv2d: ModuleSpec("Conv", _CONV),
    nn.Conv3d: ModuleSpec("Conv", _CONV),
    nn.ConvTranspose1d: ModuleSpec("ConvTranspose", {"weight": 1, "bias": 0}),
    nn.ConvTranspose2d: ModuleSpec("ConvTranspose", {"weight": 1, "bias": 0}),
    nn.ConvTranspose3d: ModuleSpec("ConvTranspose", {"weight": 1, "bias": 0}),
    nn.Linear: ModuleSpec("Gemm", {"weight": 0, "bias": 0}),
    nn.Embedding: ModuleSpec("Gather", {"weight": None}),
    nn.EmbeddingBag: ModuleSpec("Gather", {"weight": None}),  # a Gather and a (weighted) sum per bag
    nn.BatchNorm1d: ModuleSpec("BatchNormalization", {"weight": None, "bias": None}),
    nn.BatchNorm2d: ModuleSpec("BatchNormalization", {"weight": None, "bias": None}),
    nn.BatchNorm3d: ModuleSpec("BatchNormalization", {"weight": None, "bias": None}),
    nn.LayerNorm: ModuleSpec("LayerNormalization", {"weight": None, "bias": None}),
    nn.RMSNorm: ModuleSpec("RMSNormalization", {"weight": None}),
    nn.InstanceNorm1d: ModuleSpec("InstanceNormalization", {"weight": None, "bias": None}),
    nn.InstanceNorm2d: ModuleSpec("InstanceNormalization", {"weight": None, "bias": None}),
    nn.InstanceNorm3d: ModuleSpec("InstanceNormalization", {"weight": None, "bias": None}),
    nn.GroupNorm: ModuleSpec("GroupNormalization", {"weight": None, "bias": None}),
    nn.PReLU: ModuleSpec("PRelu", {"weight": 0}),
    nn.MultiheadAttention: ModuleSpec("MultiheadAttention", {"in_proj_weight": 0, "out_proj.weight": 0,
                                                             "in_proj_bias": None, "out_proj.bias": None}),
    nn.ReLU: ModuleSpec("Relu"), nn.ReLU6: ModuleSpec("Clip"), nn.GELU: ModuleSpec("Gelu"),
    nn.SiLU: ModuleSpec("Silu"), nn.Hardswish: ModuleSpec("HardSwish"),
    nn.Hardsigmoid: ModuleSpec("HardSigmoid"), nn.Sigmoid: ModuleSpec("Sigmoid"),
    nn.Tanh: ModuleSpec("Tanh"), nn.Softmax: ModuleSpec("Softmax"), nn.LogSoftmax: ModuleSpec("LogSoftmax"),
    nn.LeakyReLU: ModuleSpec("LeakyRelu"), nn.ELU: ModuleSpec("Elu"), nn.Mish: ModuleSpec("Mish"),
    nn.Softplus: ModuleSpec("Softplus"), nn.Hardtanh: ModuleSpec("Clip"), nn.GLU: ModuleSpec("Glu"),
    nn.AvgPool1d: ModuleSpec("AveragePool"), nn.AvgPool2d: ModuleSpec("AveragePool"),
    nn.AvgPool3d: ModuleSpec("AveragePool"),
    nn.AdaptiveAvgPool1d: ModuleSpec("GlobalAveragePool"), nn.AdaptiveAvgPool2d: ModuleSpec("GlobalAveragePool"),
    nn.AdaptiveAvgPool3d: ModuleSpec("GlobalAveragePool"),
    nn.Upsample: ModuleSpec("Resize"), nn.UpsamplingBilinear2d: ModuleSpec("Resize"),
    nn.UpsamplingNearest2d: ModuleSpec("Resize"),
    # data movement: values stay on the input's grid, no quantizer needed
    nn.MaxPool1d: ModuleSpec("MaxPool", passthrough=True), nn.MaxPool2d: ModuleSpec("MaxPool", passthrough=True),
    nn.MaxPool3d: ModuleSpec("MaxPool", passthrough=True),
    nn.AdaptiveMaxPool1d: ModuleSpec("MaxPool", passthrough=True),
    nn.AdaptiveMaxPool2d: ModuleSpec("MaxPool", passthrough=True),
    nn.Flatten: ModuleSpec("Flatten", passthrough=True), nn.Unflatten: ModuleSpec("Reshape", passthrough=True),
    nn.Identity: ModuleSpec("Identity", passthrough=True), nn.Dropout: ModuleSpec("Identity", passthrough=True),
    nn.Dropout1d: ModuleSpec("Identity", passthrough=True), nn.Dropout2d: ModuleSpec("Identity", passthrough=True),
    nn.PixelShuffle: ModuleSpec("DepthToSpace", passthrough=True),
    nn.ZeroPad2d: ModuleSpec("Pad", passthrough=True),
}

FUNCTIONS: dict = {
    operator.add: "Add", torch.add: "Add", operator.iadd: "Add",
    operator.sub: "Sub", torch.sub: "Sub", operator.isub: "Sub",
    operator.mul: "Mul", torch.mul: "Mul", operator.imul: "Mul",
    operator.truediv: "Div", torch.div: "Div", operator.itruediv: "Div",
    operator.matmul: "MatMul", torch.matmul: "MatMul", torch.bmm: "MatMul", torch.mm: "MatMul",
    F.embedding: "Gather",
    torch.cat: "Concat", torch.concat: "Concat", torch.stack: "Concat",
    F.relu: "Relu", torch.relu: "Relu", F.relu6: "Clip", F.hardtanh: "Clip", torch.clamp: "Clip", torch.clip: "Clip",
    F.gelu: "Gelu", F.silu: "Silu", F.hardswish: "HardSwish", F.hardsigmoid: "HardSigmoid",
    torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", torch.tanh: "Tanh", F.tanh: "Tanh",
    F.softmax: "Softmax", torch.softmax: "Softmax", F.log_softmax: "LogSoftmax",
    F.leaky_relu: "LeakyRelu", F.elu: "Elu", F.mish: "Mish",
    F.layer_norm: "LayerNormalization", F.linear: "Gemm", F.conv1d: "Conv", F.conv2d: "Conv", F.conv3d: "Conv",
    F.conv_transpose1d: "ConvTranspose", F.conv_transpose2d: "ConvTranspose", F.conv_transpose3d: "ConvTranspose",
    F.avg_pool1d: "AveragePool", F.avg_pool2d: "AveragePool", F.adaptive_avg_pool1d: "GlobalAveragePool",
    F.adaptive_avg_pool2d: "GlobalAveragePool", F.glu: "Glu", torch.einsum: "Einsum",
    F.interpolate: "Resize", torch.mean: "ReduceMean", torch.sum: "ReduceSum",
    torch.pow: "Pow", operator.pow: "Pow", torch.sqrt: "Sqrt", torch.exp: "Exp", torch.rsqrt: "Reciprocal",
    torch.log: "Log", torch.log1p: "Log", torch.log2: "Log", torch.log10: "Log", torch.abs: "Abs",
    F.scaled_dot_product_attention: "Attention",
}
METHODS: dict = {
    "add": "Add", "add_": "Add", "sub": "Sub", "mul": "Mul", "mul_": "Mul", "div": "Div",
    "matmul": "MatMul", "bmm": "MatMul", "relu": "Relu", "relu_": "Relu", "sigmoid": "Sigmoid",
    "tanh": "Tanh", "softmax": "Softmax", "mean": "ReduceMean", "sum": "ReduceSum", "pow": "Pow",
    "sqrt": "Sqrt", "exp": "Exp", "clamp": "Clip", "clip": "Clip", "clamp_": "Clip", "clip_": "Clip",
    "log": "Log", "log1p": "Log", "log2": "Log", "log10": "Log", "abs": "Abs",
}
PASSTHROUGH_FUNCTIONS = {
    operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
    torch.unsqueeze, torch.split, torch.chunk, F.dropout, F.max_pool2d, F.max_pool1d, F.pad,
    torch.narrow, torch.t, getattr, torch.unbind, F.pixel_shuffle, torch.roll,
    # tensor factories make constants (position ids, masks), not activations
    torch.arange, torch.zeros, torch.ones, torch.full, torch.zeros_like, torch.ones_like, torch.full_like,
}
PASSTHROUGH_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "expand", "expand_as", "split", "chunk", "t", "size", "dim", "repeat", "narrow", "unbind",
    "view_as", "reshape_as", "to", "float", "type_as", "detach", "clone", "flip", "roll",
    "unfold",  # sliding windows: the same values, rearranged
}


# aten ops (graphs captured with torch.export) speak the same op types
ATEN_FUNCTIONS: dict = {
    "add.Tensor": "Add", "add_.Tensor": "Add", "sub.Tensor": "Sub", "rsub.Scalar": "Sub",
    "mul.Tensor": "Mul", "mul_.Tensor": "Mul", "div.Tensor": "Div", "div.Tensor_mode": "Div",
    "matmul.default": "MatMul", "bmm.default": "MatMul", "mm.default": "MatMul",
    "baddbmm.default": "MatMul", "addmm.default": "Gemm", "linear.default": "Gemm",
    "conv1d.default": "Conv", "conv2d.default": "Conv", "conv3d.default": "Conv",
    "conv1d.padding": "Conv", "conv2d.padding": "Conv", "conv3d.padding": "Conv",
    "convolution.default": "Conv", "conv_transpose2d.input": "ConvTranspose",
    "conv_transpose1d.default": "ConvTranspose", "conv_transpose3d.input": "ConvTranspose",
    "cat.default": "Concat", "stack.default": "Concat", "concat.default": "Concat",
    "relu.default": "Relu", "relu_.default": "Relu", "hardtanh.default": "Clip", "hardtanh_.default": "Clip",
    "relu6.default": "Clip", "clamp.default": "Clip", "clamp.Tensor": "Clip", "clip.default": "Clip",
    "gelu.default": "Gelu", "silu.default": "Silu", "silu_.default": "Silu", "hardswish.default": "HardSwish",
    "hardswish_.default": "HardSwish", "hardsigmoid.default": "HardSigmoid", "sigmoid.default": "Sigmoid",
    "tanh.default": "Tanh", "softmax.int": "Softmax", "_softmax.default": "Softmax",
    "log_softmax.int": "LogSoftmax", "_log_softmax.default": "LogSoftmax",
    "leaky_relu.default": "LeakyRelu", "elu.default": "Elu", "mish.default": "Mish", "softplus.default": "Softplus",
    "glu.default": "Glu", "einsum.default": "Einsum",
    "layer_norm.default": "LayerNormalization", "group_norm.default": "GroupNormalization",
    "batch_norm.default": "BatchNormalization", "_native_batch_norm_legit_no_training.default": "BatchNormalization",
    "avg_pool1d.default": "AveragePool", "avg_pool2d.default": "AveragePool",
    "adaptive_avg_pool1d.default": "GlobalAveragePool", "adaptive_avg_pool2d.default": "GlobalAveragePool",
    "upsample_nearest2d.vec": "Resize", "upsample_bilinear2d.vec": "Resize", "upsample_nearest2d.default": "Resize",
    "upsample_bilinear2d.default": "Resize",
    "mean.dim": "ReduceMean", "mean.default": "ReduceMean", "sum.dim_IntList": "ReduceSum", "sum.default": "ReduceSum",
    "pow.Tensor_Scalar": "Pow", "pow.Tensor_Tensor": "Pow", "sqrt.default": "Sqrt", "rsqrt.default": "Reciprocal",
    "exp.default": "Exp", "embedding.default": "Gather", "prelu.default": "PRelu",
    "log.default": "Log", "log1p.default": "Log", "log2.default": "Log", "log10.default": "Log", "abs.default": "Abs",
    "scaled_dot_product_attention.default": "Attention",
}
ATEN_PASSTHROUGH = {
    "view.default", "reshape.default", "_unsafe_view.default", "permute.default", "transpose.int", "t.default",
    "unsqueeze.default", "squeeze.dim", "squeeze.dims", "squeeze.default", "expand.default", "expand_as.default",
    "slice.Tensor", "select.int", "narrow.default", "clone.default", "contiguous.default", "flatten.using_ints",
    "alias.default", "detach.default", "dropout.default", "feature_dropout.default", "split.Tensor",
    "split_with_sizes.default", "chunk.default", "unbind.int", "max_pool1d.default", "max_pool2d.default",
    "max_pool2d_with_indices.default", "max_pool3d.default", "adaptive_max_pool2d.default", "pad.default",
    "constant_pad_nd.default", "pixel_shuffle.default", "roll.default", "flip.default", "repeat.default",
    "index.Tensor", "index_select.default", "gather.default", "masked_fill.Scalar", "masked_fill.Tensor",
    "to.dtype", "to.device", "to.dtype_layout", "_to_copy.default", "type_as.default", "lift_fresh_copy.default",
    "sym_size.int", "sym_numel.default", "_assert_tensor_metadata.default", "zeros_like.default",
    "ones_like.default", "full_like.default", "arange.default", "arange.start", "arange.start_step",
    "zeros.default", "ones.default", "full.default", "new_ones.default", "new_zeros.default", "new_full.default",
    "scalar_tensor.default", "where.self", "ge.Scalar", "gt.Scalar", "le.Scalar", "lt.Scalar", "eq.Scalar",
    "ne.Scalar", "__and__.Tensor", "__or__.Tensor", "logical_not.default", "bitwise_not.default",
    "unflatten.int", "copy_.default", "copy.default",  # copy_: `out[t] = y` into a preallocated buffer
    "view_as.default", "reshape_as.default", "repeat_interleave.self_int",
}


def _aten_key(target) -> str | None:
    """'add.Tensor' for torch.ops.aten.add.Tensor (None for anything else)."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return f"{target._schema.name.split('::')[-1]}.{target._overloadname or 'default'}"
    return None


def function_op_type(target) -> str | None:
    """ONNX op type of a call_function target (torch function or aten op)."""
    if target in FUNCTIONS:
        return FUNCTIONS[target]
    key = _aten_key(target)
    return ATEN_FUNCTIONS.get(key) if key else None


def is_passthrough_function(target) -> bool:
    if target in PASSTHROUGH_FUNCTIONS:
        return True
    return _aten_key(target) in ATEN_PASSTHROUGH


def register_module(cls: type, op_type: str, params: dict | None = None, passthrough: bool = False) -> None:
    """Teach QuantSim a module type: its ONNX op type and {param name: channel axis or None}."""
    MODULES[cls] = ModuleSpec(op_type, dict(params or {}), passthrough)


def register_function(target, op_type: str) -> None:
    """Teach QuantSim a function (or a tensor method name) whose output should be quantized."""
    (METHODS if isinstance(target, str) else FUNCTIONS)[target] = op_type


# Quantized twins: module types replaced by a dedicated quantized module (e.g. recurrent
# layers). factory(module, name, sim) -> nn.Module; sim.new_quantizer(...) makes quantizers
# that follow the config. Twin types are leaves of the capture.
TWINS: dict[type, Callable] = {}


def register_twin(cls: type, factory: Callable, accepts: Callable[[nn.Module], bool] | None = None) -> None:
    """Teach QuantSim a module type with its own quantized implementation; ``accepts(module)``
    says which configurations of the type it covers (the others have no twin)."""
    TWINS[cls] = (factory, accepts)


def twin_factory(m: nn.Module) -> Callable | None:
    entry = TWINS.get(type(m))
    if entry is None:
        entry = next((e for t, e in TWINS.items() if isinstance(m, t)), None)
    if entry is None or (entry[1] is not None and not entry[1](m)):
        return None
    return entry[0]


def module_spec(m: nn.Module) -> ModuleSpec | None:
    """The spec of m's type, or of its nearest registered base class (Conv2d subclasses)."""
    spec = MODULES.get(type(m))
    if spec is None:
        spec = next((s for t, s in MODULES.items() if isinstance(m, t)), None)
    return spec


def is_known_leaf(m: nn.Module) -> bool:
    """Modules QuantSim wraps whole: registered types, their subclasses that hold weights
    (a same-padding Conv2d subclass keeps its weight quantizer), and twins."""
    if type(m) in MODULES or twin_factory(m) is not None:
        return True
    spec = module_spec(m)
    return spec is not None and bool(spec.params) and not list(m.children())


def is_float_leaf(m: nn.Module) -> bool:
    """torch.nn modules QuantSim knows nothing about (kept whole, in float, output quantized)."""
    return (m.__module__.startswith("torch.nn") and not list(m.children()) and not isinstance(m, nn.Sequential)
            and module_spec(m) is None and twin_factory(m) is None)


class TraceError(RuntimeError):
    """Neither torch.fx nor torch.export could capture the model (the message says where and why)."""


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple, leaf_names: set):
        super().__init__()
        self.leaf_types, self.leaf_names = leaf_types, leaf_names
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return is_known_leaf(m) or is_float_leaf(m)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m) or type(m).__name__
            raise


def trace(model: nn.Module, leaf_types: tuple = (), leaf_names=(), concrete_args=None) -> fx.GraphModule:
    """Symbolically trace model with torch.fx; errors name the module that failed."""
    tracer = _Tracer(tuple(leaf_types), set(leaf_names))
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:
        where = f" in module '{tracer.failed_in}'" if tracer.failed_in else ""
        raise TraceError(
            f"QuantSim could not trace the model with torch.fx{where}: {type(e).__name__}: {e}\n"
            "Data-dependent Python control flow cannot be traced. Either pass that module in "
            "QuantSim(..., leaf_modules=[...]) (its output is quantized, its inside stays float), "
            "or fix the input-dependent branches with concrete_args."
        ) from e
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


@dataclass
class OpInfo:
    node: fx.Node
    op_type: str | None          # None: not an op we quantize (unknown or passthrough)
    passthrough: bool = False
    module: nn.Module | None = None
    spec: ModuleSpec | None = None
    twin: Callable | None = None     # build a quantized twin instead of a QuantizedModule
    float_leaf: bool = False         # unknown module kept whole in float, output quantized


def classify(gm: fx.GraphModule, excluded: set, kinds: dict | None = None) -> tuple[list[OpInfo], list[str], list[str]]:
    """Op info per node, plus float-leaf module paths (no quantized version) and unknown function
    names. ``kinds`` (node -> 'float'/'int'/'other', from a run) marks size arithmetic and
    integer ops: not quantized, not reported."""
    infos, unsupported, unknown = [], [], []
    mods = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = mods[node.target]
            if node.target in excluded or type(m) in excluded or node.target == "_guards_fn":
                infos.append(OpInfo(node, None, module=m))
                continue
            twin = twin_factory(m)
            if twin is not None:
                infos.append(OpInfo(node, type(m).__name__, module=m, twin=twin))
                continue
            spec = module_spec(m)
            if spec is None:
                unsupported.append(f"{node.target} ({type(m).__module__}.{type(m).__name__})")
                infos.append(OpInfo(node, type(m).__name__, module=m, float_leaf=True))
                continue
            infos.append(OpInfo(node, spec.op_type, spec.passthrough, m, spec))
        elif node.op in ("call_function", "call_method") and kinds is not None and kinds.get(node) != "float":
            infos.append(OpInfo(node, None, passthrough=True))
        elif node.op == "call_function":
            op_type = function_op_type(node.target)
            if op_type is not None:
                infos.append(OpInfo(node, op_type))
            else:
                passthrough = is_passthrough_function(node.target)
                infos.append(OpInfo(node, None, passthrough=passthrough))
                if not passthrough:
                    unknown.append(getattr(node.target, "__name__", str(node.target)))
        elif node.op == "call_method":
            if node.target in METHODS:
                infos.append(OpInfo(node, METHODS[node.target]))
            else:
                infos.append(OpInfo(node, None, passthrough=node.target in PASSTHROUGH_METHODS))
                if node.target not in PASSTHROUGH_METHODS:
                    unknown.append("Tensor." + node.target)
        else:
            infos.append(OpInfo(node, None))
    return infos, unsupported, sorted(set(unknown))


def _skip_identity(node, by_node):
    """The single consumer of node, looking through Identity/Dropout (e.g. folded BNs)."""
    users = list(node.users)
    while len(users) == 1 and by_node.get(users[0]) is not None and by_node[users[0]].op_type == "Identity":
        users = list(users[0].users)
    return users[0] if len(users) == 1 and by_node.get(users[0]) is not None else None


def match_supergroups(infos: list[OpInfo], patterns: list[list[str]]) -> set:
    """Nodes whose output is inside a fused group (all but the last op of a matched chain)."""
    by_node = {i.node: i for i in infos}
    fused = set()
    for info in infos:
        for pat in patterns:
            if info.op_type != pat[0]:
                continue
            chain, cur = [info.node], info.node
            ok = True
            for want in pat[1:]:
                nxt = _skip_identity(cur, by_node)
                if nxt is None or by_node[nxt].op_type != want:
                    ok = False
                    break
                cur = nxt
                chain.append(cur)
            if ok:
                fused.update(chain[:-1])
    return fused

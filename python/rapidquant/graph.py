"""Graph capture for QuantSim: torch.fx tracing and the op vocabulary (ONNX op types).

Modules are classified by type, functions and tensor methods by target. Every op gets
an ONNX op type name, which is what hardware configs (AIMET's schema) speak.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

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
    nn.Linear: ModuleSpec("Gemm", {"weight": 0, "bias": 0}),
    nn.Embedding: ModuleSpec("Gather", {"weight": None}),
    nn.BatchNorm1d: ModuleSpec("BatchNormalization", {"weight": None, "bias": None}),
    nn.BatchNorm2d: ModuleSpec("BatchNormalization", {"weight": None, "bias": None}),
    nn.BatchNorm3d: ModuleSpec("BatchNormalization", {"weight": None, "bias": None}),
    nn.LayerNorm: ModuleSpec("LayerNormalization", {"weight": None, "bias": None}),
    nn.GroupNorm: ModuleSpec("GroupNormalization", {"weight": None, "bias": None}),
    nn.PReLU: ModuleSpec("PRelu", {"weight": 0}),
    nn.MultiheadAttention: ModuleSpec("MultiheadAttention", {"in_proj_weight": 0, "out_proj.weight": 0,
                                                             "in_proj_bias": None, "out_proj.bias": None}),
    nn.ReLU: ModuleSpec("Relu"), nn.ReLU6: ModuleSpec("Clip"), nn.GELU: ModuleSpec("Gelu"),
    nn.SiLU: ModuleSpec("Silu"), nn.Hardswish: ModuleSpec("HardSwish"),
    nn.Hardsigmoid: ModuleSpec("HardSigmoid"), nn.Sigmoid: ModuleSpec("Sigmoid"),
    nn.Tanh: ModuleSpec("Tanh"), nn.Softmax: ModuleSpec("Softmax"), nn.LogSoftmax: ModuleSpec("LogSoftmax"),
    nn.LeakyReLU: ModuleSpec("LeakyRelu"), nn.ELU: ModuleSpec("Elu"), nn.Mish: ModuleSpec("Mish"),
    nn.Softplus: ModuleSpec("Softplus"), nn.Hardtanh: ModuleSpec("Clip"),
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
    torch.cat: "Concat", torch.concat: "Concat", torch.stack: "Concat",
    F.relu: "Relu", torch.relu: "Relu", F.relu6: "Clip", F.hardtanh: "Clip", torch.clamp: "Clip",
    F.gelu: "Gelu", F.silu: "Silu", F.hardswish: "HardSwish", F.hardsigmoid: "HardSigmoid",
    torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", torch.tanh: "Tanh", F.tanh: "Tanh",
    F.softmax: "Softmax", torch.softmax: "Softmax", F.log_softmax: "LogSoftmax",
    F.leaky_relu: "LeakyRelu", F.elu: "Elu", F.mish: "Mish",
    F.layer_norm: "LayerNormalization", F.linear: "Gemm", F.conv2d: "Conv",
    F.avg_pool2d: "AveragePool", F.adaptive_avg_pool2d: "GlobalAveragePool",
    F.interpolate: "Resize", torch.mean: "ReduceMean", torch.sum: "ReduceSum",
    torch.pow: "Pow", operator.pow: "Pow", torch.sqrt: "Sqrt", torch.exp: "Exp", torch.rsqrt: "Reciprocal",
    F.scaled_dot_product_attention: "Attention",
}
METHODS: dict = {
    "add": "Add", "add_": "Add", "sub": "Sub", "mul": "Mul", "mul_": "Mul", "div": "Div",
    "matmul": "MatMul", "bmm": "MatMul", "relu": "Relu", "relu_": "Relu", "sigmoid": "Sigmoid",
    "tanh": "Tanh", "softmax": "Softmax", "mean": "ReduceMean", "sum": "ReduceSum", "pow": "Pow",
    "sqrt": "Sqrt", "exp": "Exp", "clamp": "Clip",
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
}


def register_module(cls: type, op_type: str, params: dict | None = None, passthrough: bool = False) -> None:
    """Teach QuantSim a module type: its ONNX op type and {param name: channel axis or None}."""
    MODULES[cls] = ModuleSpec(op_type, dict(params or {}), passthrough)


def register_function(target, op_type: str) -> None:
    """Teach QuantSim a function (or a tensor method name) whose output should be quantized."""
    (METHODS if isinstance(target, str) else FUNCTIONS)[target] = op_type


class TraceError(RuntimeError):
    pass


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple, leaf_names: set):
        super().__init__()
        self.leaf_types, self.leaf_names = leaf_types, leaf_names
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        if type(m) in MODULES:
            return True
        # torch.nn modules without children are leaves (reported if unsupported)
        return m.__module__.startswith("torch.nn") and not list(m.children()) and not isinstance(m, nn.Sequential)

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


def classify(gm: fx.GraphModule, excluded: set) -> tuple[list[OpInfo], list[str], list[str]]:
    """Op info per node, plus unsupported module paths and unknown function names."""
    infos, unsupported, unknown = [], [], []
    mods = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            m = mods[node.target]
            if node.target in excluded or type(m) in excluded:
                infos.append(OpInfo(node, None, module=m))
                continue
            spec = MODULES.get(type(m))
            if spec is None:
                spec = next((s for t, s in MODULES.items() if isinstance(m, t)), None)
            if spec is None:
                unsupported.append(f"{node.target} ({type(m).__module__}.{type(m).__name__})")
                infos.append(OpInfo(node, None, module=m))
                continue
            infos.append(OpInfo(node, spec.op_type, spec.passthrough, m, spec))
        elif node.op == "call_function":
            if node.target in FUNCTIONS:
                infos.append(OpInfo(node, FUNCTIONS[node.target]))
            else:
                infos.append(OpInfo(node, None, passthrough=node.target in PASSTHROUGH_FUNCTIONS))
                if node.target not in PASSTHROUGH_FUNCTIONS:
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

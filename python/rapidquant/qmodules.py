"""Modules QuantSim puts into the traced graph: quantized module wrappers and functional ops."""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rapidquant.quantizer import Quantizer

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def conv_with_weight(m: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The convolution of Conv1d/2d/3d ``m`` (a subclass: its base class's op, not its own
    forward) with weight ``w`` and bias ``b``; other padding modes pad as ``m`` does."""
    if m.padding_mode == "zeros":
        conv = _CONV.get(type(m)) or next(fn for cls, fn in _CONV.items() if isinstance(m, cls))
        return conv(x, w, b, m.stride, m.padding, m.dilation, m.groups)
    return functional_call(m, {"weight": w} if b is None else {"weight": w, "bias": b}, (x,))


_SIMULATE_INT32_BIAS = [True]
INT32_BIAS_LIMIT = 2 ** 31 - 128  # the largest float32 below 2**31: it casts to int32 exactly


@contextmanager
def float_biases():
    """Trace Conv/Linear wrappers with their float bias: the ONNX export writes the int32
    bias into the graph itself (an initializer behind a DequantizeLinear, the form
    onnxruntime fuses), instead of tracing the rounding arithmetic."""
    _SIMULATE_INT32_BIAS.append(False)
    try:
        yield
    finally:
        _SIMULATE_INT32_BIAS.pop()


def _int_grid(q: Quantizer | None) -> bool:
    """q quantizes now (enabled, calibrated, not observing) on an integer grid."""
    return q is not None and q.enabled and q.dtype == "int" and q.scale is not None and q.observer is None


def _fresh(out, args) -> bool:
    """True when out is a new tensor (not one of the inputs, e.g. ReLU(inplace=True))."""
    if type(out) is not torch.Tensor or torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False  # fake/traced tensors have no storage; autograd needs the input
    p = out.data_ptr()
    for a in args:
        if isinstance(a, torch.Tensor) and a.data_ptr() == p:
            return False
    return True


def _cache_key(p: torch.Tensor, q: Quantizer) -> tuple | None:
    """What a cached quantized parameter depends on: the weight's storage and version, the
    quantizer's state and its scale tensor. None for a tensor without storage (the fake
    parameters of torch.export, e.g. of a frozen layer): computed fresh, never cached."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return None
    try:
        ptr = p.data_ptr()
    except RuntimeError:
        return None
    return (ptr, p._version, q.version, id(q.scale) if q.scale is not None else 0,
            q.scale._version if q.scale is not None else 0)


class QuantizedModule(nn.Module):
    """Wraps a module: quantized parameters (cached in eval mode) and a quantized output.

    ``module`` is the original module (its parameters are the float master weights),
    ``param_quantizers`` maps parameter names to quantizers, ``output_quantizer`` may be
    None. ``op_type`` is the ONNX op type the hardware config knows it as.
    """

    def __init__(self, module: nn.Module, op_type: str, param_quantizers: dict[str, Quantizer],
                 output_quantizer: Quantizer | None):
        super().__init__()
        self.module = module
        self.op_type = op_type
        self.param_quantizers = nn.ModuleDict({k.replace(".", "__"): q for k, q in param_quantizers.items()})
        self._param_names = {k.replace(".", "__"): k for k in param_quantizers}
        self.output_quantizer = output_quantizer
        self._cache: dict[str, tuple] = {}
        # the quantizer whose output is this layer's input (set by QuantSim; a tuple so it is
        # not registered twice as a submodule): the bias is simulated on its int32 grid
        self.bias_input: tuple[Quantizer, ...] = ()
        # key -> a function of the float parameter used in place of its quantizer while set
        # (block reconstruction's learned soft rounding); the quantizer stays, with its grid
        self.param_overrides: dict[str, nn.Module] = {}

    def param(self, name: str) -> torch.Tensor:
        return self.module.get_parameter(name)

    def param_name(self, key: str) -> str:
        """The parameter's name in ``module`` for a ``param_quantizers`` key."""
        return self._param_names[key]

    def quantized_param(self, key: str) -> torch.Tensor:
        """The parameter after its quantizer; reused while neither weight nor encoding changes."""
        q = self.param_quantizers[key]
        p = self.param(self._param_names[key])
        if key in self.param_overrides:
            return self.param_overrides[key](p)
        if not q.enabled:
            return p
        track_grad = torch.is_grad_enabled() and (p.requires_grad or any(t.requires_grad for t in q.parameters()))
        if self.training or track_grad:
            return q(p)
        key_now = _cache_key(p, q)
        if key_now is None:
            return q(p)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == key_now:
            return hit[1]
        qp = q(p)
        self._cache[key] = (key_now, qp)
        return qp

    def bias_grid(self, weight_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """The int32 bias step (s_input * s_weight, per output channel or one) when this
        Conv/Linear's bias runs as int32 in the deployed model, else None. ``weight_scale``:
        the step for that weight scale instead of the quantizer's own.

        onnxruntime quantizes the float bias of every Conv/Gemm whose input and weight come
        from DequantizeLinear nodes (its BiasQuantization pass, at the default optimization
        level), and integer targets do the same; the export writes that int32 bias into the
        file. Not for per-block weights or a per-channel input (onnxruntime leaves those)."""
        m, src = self.module, self.bias_input[0] if self.bias_input else None
        qw = self.param_quantizers["weight"] if "weight" in self.param_quantizers else None
        if getattr(m, "bias", None) is None or "bias" in self.param_quantizers \
                or not (_int_grid(src) and _int_grid(qw)) or qw.block_size is not None or src.scale.numel() != 1:
            return None
        s_w = qw.scale if weight_scale is None else weight_scale
        return src.scale.detach().reshape(()) * s_w.detach().reshape(-1)  # float32, as onnxruntime's Mul

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias as the deployed model adds it: round(b / step) * step in float32, the
        arithmetic of onnxruntime's Div, Round (half to even) and DequantizeLinear."""
        b = self.module.bias
        step = self.bias_grid() if _SIMULATE_INT32_BIAS[-1] else None
        if step is None:
            return b
        bq = torch.round(b.detach().float() / step).clamp_(-INT32_BIAS_LIMIT, INT32_BIAS_LIMIT) * step
        return b + (bq.to(b.dtype) - b).detach()  # straight-through for training

    def forward(self, *args, **kwargs):
        m = self.module
        if not self.param_quantizers:
            out = m(*args, **kwargs)
        elif type(m) in _CONV and set(self.param_quantizers) <= {"weight"} and not kwargs:
            out = conv_with_weight(m, args[0], self.quantized_param("weight"), self.quantized_bias())
        elif type(m) is nn.Linear and set(self.param_quantizers) <= {"weight"} and not kwargs:
            out = F.linear(args[0], self.quantized_param("weight"), self.quantized_bias())
        else:
            params = {self._param_names[k]: self.quantized_param(k) for k in self.param_quantizers}
            out = functional_call(m, params, args, kwargs)
        q = self.output_quantizer
        if q is None:
            return out
        if isinstance(out, tuple):  # e.g. MultiheadAttention: (output, weights); LSTM: (output, (h, c))
            return (q(out[0]),) + tuple(out[1:])
        return q(out, inplace=_fresh(out, args))

    def clear_cache(self) -> None:
        self._cache.clear()

    def extra_repr(self) -> str:
        return f"op_type={self.op_type}"


class FunctionalOp(nn.Module):
    """A function or tensor method from the traced graph, with its output quantized."""

    def __init__(self, kind: str, target, op_type: str, output_quantizer: Quantizer):
        super().__init__()
        self.kind, self.target, self.op_type = kind, target, op_type
        self.output_quantizer = output_quantizer

    def forward(self, *args, **kwargs):
        if self.kind == "call_function":
            out = self.target(*args, **kwargs)
        else:
            out = getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.output_quantizer(out, inplace=_fresh(out, args))

    def extra_repr(self) -> str:
        name = self.target if isinstance(self.target, str) else getattr(self.target, "__name__", str(self.target))
        return f"{self.kind}={name}, op_type={self.op_type}"


class InputQuantizer(nn.Module):
    """Quantizes one model input."""

    def __init__(self, quantizer: Quantizer):
        super().__init__()
        self.output_quantizer = quantizer
        self.op_type = "Input"

    def forward(self, x):
        return self.output_quantizer(x)


class QuantizedParameter(nn.Module):
    """Quantizes a parameter that an op uses directly (``F.conv2d(x, self.weight)`` in a
    Conv2d subclass's own forward, ``x @ self.w``): the graph feeds the parameter through
    this module. ``source`` is the parameter's name in the sim's model; the quantized
    value is reused in eval mode while neither weight nor encoding changes."""

    def __init__(self, quantizer: Quantizer, source: str, op_type: str):
        super().__init__()
        self.quantizer = quantizer
        self.source = source
        self.op_type = op_type
        self._cache: tuple | None = None

    def forward(self, p):
        q = self.quantizer
        if not q.enabled or q.observer is not None:
            return p
        track_grad = torch.is_grad_enabled() and (p.requires_grad or any(t.requires_grad for t in q.parameters()))
        if self.training or track_grad:
            return q(p)
        key = _cache_key(p, q)
        if key is None:
            return q(p)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        qp = q(p)
        self._cache = (key, qp)
        return qp

    def clear_cache(self) -> None:
        self._cache = None

    def extra_repr(self) -> str:
        return f"source={self.source}, op_type={self.op_type}"

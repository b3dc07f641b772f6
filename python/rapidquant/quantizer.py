"""The Quantizer module: one tensor's encoding, its calibration, and its forward."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rapidquant import ops
from rapidquant.ops import named
from rapidquant.calibration import HIST_SCHEMES, SCHEMES, Observer, Stats, encoding_range
from rapidquant.reference.qdq import round_ste

FLOAT_FORMATS = {
    "fp16": torch.float16, "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
}


def min_scale(num_steps: int) -> float:
    """Smallest scale an encoding may have (AIMET's rule): keeps zero ranges valid."""
    return min(torch.finfo(torch.float32).eps, 0.01 / num_steps)


@dataclass(frozen=True)
class QuantizerState:
    """What a quantizer computes: precision, encoding (copies) and flags. ``Quantizer.state()``
    takes one, ``Quantizer.restore(state)`` puts it back exactly."""
    enabled: bool
    dtype: str
    bitwidth: int
    float_format: str | None
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None
    frozen: bool

    def precision(self) -> tuple:
        return self.dtype, self.bitwidth, self.float_format


class Quantizer(nn.Module):
    """Quantize-dequantize one tensor (an activation or a parameter).

    Holds the encoding in ONNX form: ``scale`` and an integer-valued ``zero_point`` (both
    per tensor, per channel along ``axis`` or per block), the grid ``[qmin, qmax]`` from
    ``bitwidth`` and ``signed``, and flags: ``enabled`` (off = identity), ``frozen``
    (calibration does not overwrite the encoding). ``dtype="float"`` makes it a float
    quantizer (``float_format`` fp16, bf16, fp8_e4m3 or fp8_e5m2).
    """

    def __init__(self, bitwidth: int = 8, symmetric: bool = False, signed: bool | None = None,
                 axis: int | None = None, block_size=None, scheme: str = "minmax",
                 percentile: float = 99.99, gamma: float = 3.0, dtype: str = "int",
                 float_format: str | None = None, learn_range: bool = False, name: str = "",
                 bins: int = 2048, nonfinite: str = "raise"):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme '{scheme}'; choose one of {SCHEMES}")
        if dtype not in ("int", "float"):
            raise ValueError(f"dtype must be 'int' or 'float' (got {dtype!r})")
        self.version = 0  # bumped whenever the effective encoding changes (weight caches key on it)
        self.name = name
        self.symmetric = symmetric
        self._signed = signed
        self.axis, self.block_size = axis, block_size
        self.scheme, self.percentile, self.gamma = scheme, percentile, gamma
        self.learn_range = learn_range
        self.bins, self.nonfinite = bins, nonfinite
        self.enabled = True
        self.frozen = False
        self.observer: Observer | None = None
        self.stats: Stats | None = None
        # (probability, seed) while block reconstruction learns (QDrop): each element keeps
        # its float value with that probability; None otherwise
        self.qdrop: tuple[float, int] | None = None
        # (min, max) a hardware config fixes, None for an end calibration sets (encoding_constraints
        # with only "min" or only "max"): every encoding computed from statistics keeps them
        self.fixed_range: tuple[float | None, float | None] = (None, None)
        self.dtype = dtype
        self.float_format = float_format
        self.bitwidth = bitwidth
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    # ------------------------------------------------------------ grid
    @property
    def bitwidth(self) -> int:
        return self._bitwidth

    @bitwidth.setter
    def bitwidth(self, bw: int) -> None:
        if getattr(self, "_frozen", False) and self.scale is not None and int(bw) != self._bitwidth:
            raise ValueError(f"quantizer '{self.name}' holds a frozen {self._bitwidth}-bit encoding (e.g. AdaRound's "
                             f"rounding); a {bw}-bit grid needs a new one: call set_precision('{self.dtype}', {bw}) "
                             "to recompute it from the statistics, or set frozen = False first")
        if self.dtype == "int":
            if not 2 <= int(bw) <= 16:
                raise ValueError(f"quantizer '{self.name}': integer bitwidth must be in 2..16 (got {bw})")
        else:
            fmt = self.float_format or {16: "fp16", 8: "fp8_e4m3"}.get(int(bw))
            if fmt is None or fmt not in FLOAT_FORMATS:
                raise ValueError(f"quantizer '{self.name}': float quantizers are 16 bit (fp16/bf16) or "
                                 f"8 bit (fp8_e4m3/fp8_e5m2); got bitwidth {bw}, format {self.float_format}")
            if (bw == 16) != (fmt in ("fp16", "bf16")):
                raise ValueError(f"quantizer '{self.name}': format {fmt} is not {bw} bit")
            self.float_format = fmt
        self._bitwidth = int(bw)
        self.invalidate()

    @property
    def signed(self) -> bool:
        return self.symmetric if self._signed is None else self._signed

    @signed.setter
    def signed(self, value: bool | None) -> None:
        self._signed = value
        self.invalidate()

    # Setters that change what the quantizer computes bump the version, so no caller clears
    # the quantized modules' weight caches by hand.
    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        self.invalidate()

    @property
    def frozen(self) -> bool:
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self._frozen = bool(value)
        self.invalidate()

    @property
    def symmetric(self) -> bool:
        return self._symmetric

    @symmetric.setter
    def symmetric(self, value: bool) -> None:
        self._symmetric = bool(value)
        self.invalidate()

    @property
    def qrange(self) -> tuple[int, int]:
        return ops.qrange(self.bitwidth, self.signed)

    @property
    def is_initialized(self) -> bool:
        return self.dtype == "float" and self.float_format in ("fp16", "bf16") or self.scale is not None

    def invalidate(self) -> None:
        """Mark the effective encoding changed (caches keyed on ``version`` rebuild)."""
        self.version += 1

    def set_dtype(self, dtype: str, bitwidth: int, float_format: str | None = None) -> None:
        """Switch between integer and float quantization (keeps collected statistics)."""
        old = (self.dtype, self._bitwidth, self.float_format)
        self.dtype, self.float_format = dtype, float_format
        try:
            self.bitwidth = bitwidth
        except ValueError:
            self.dtype, self._bitwidth, self.float_format = old
            raise
        if dtype == "int" and None not in self.fixed_range:  # a range the hardware config fixes
            self.set_range(torch.tensor(self.fixed_range[0]), torch.tensor(self.fixed_range[1]))
        elif dtype == "int" or self.float_format in ("fp8_e4m3", "fp8_e5m2"):
            if self.stats is not None and not self.frozen:
                self.compute_encoding()
            elif dtype == "int" and old[0] == "float":
                self.scale = self.zero_point = None

    def precision(self) -> tuple:
        """(dtype, bitwidth, float_format), comparable with QuantizerState.precision()."""
        return self.dtype, self.bitwidth, self.float_format

    def state(self) -> QuantizerState:
        return QuantizerState(self.enabled, self.dtype, self.bitwidth, self.float_format,
                              None if self.scale is None else self.scale.detach().clone(),
                              None if self.zero_point is None else self.zero_point.detach().clone(), self.frozen)

    def restore(self, state: QuantizerState) -> None:
        """Put back a state taken by ``state()`` (the encoding bit for bit)."""
        self.enabled = state.enabled
        if state.scale is not None:
            self.set_precision(*state.precision(), encoding=(state.scale, state.zero_point))
        else:
            self.set_precision(*state.precision())
        self.frozen = state.frozen

    def set_precision(self, dtype: str, bitwidth: int, float_format: str | None = None, *,
                      encoding=None, keep_frozen: bool = True) -> None:
        """Put the quantizer at (dtype, bitwidth, float_format).

        encoding: (scale, zero_point) saved earlier for exactly this precision, set as is.
        Without it, a changed grid gets a new encoding from the statistics (a frozen
        encoding is for the old grid, so it is recomputed; keep_frozen=False leaves the
        quantizer unfrozen afterwards); an unchanged grid keeps its encoding.
        """
        if encoding is not None:
            self.frozen = False  # the caller decides whether the given encoding is frozen
            self.dtype, self.float_format = dtype, float_format
            self.bitwidth = bitwidth  # validates
            self.set_encoding(*encoding)
            return
        current = (self.dtype, self.bitwidth, self.float_format if self.dtype == "float" else None)
        if current != (dtype, bitwidth, float_format) or self.scale is None:
            was, self.frozen = self.frozen, False
            self.set_dtype(dtype, bitwidth, float_format)
            self.frozen = was and keep_frozen
        self.invalidate()

    # ------------------------------------------------------------ encodings
    def set_range(self, mn, mx) -> None:
        """Set the encoding from a real range (per group), AIMET/ONNX conventions.

        The range is widened to include 0; a range narrower than the minimum scale is
        widened (zero-range tensors stay valid); symmetric grids are centred on 0.
        """
        mn = torch.as_tensor(mn, dtype=torch.float32).clone()
        mx = torch.as_tensor(mx, dtype=torch.float32).clone()
        if self.dtype == "float":  # fp8: absmax scaling, max maps onto the format's max
            amax = torch.maximum(mn.abs(), mx.abs())
            fmax = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}.get(self.float_format)
            if fmax is None:
                return
            self._store(torch.clamp(amax / fmax, min=1e-12), torch.zeros_like(amax))
            return
        if not (torch.isfinite(mn).all() and torch.isfinite(mx).all()):
            raise ValueError(f"quantizer '{self.name}': range contains NaN or Inf")
        qmin, qmax = self.qrange
        n = qmax - qmin
        mn, mx = torch.clamp(mn, max=0.0), torch.clamp(mx, min=0.0)
        eps = min_scale(n)
        mx = torch.where((mx - mn) / n < eps, mn + eps * n, mx)
        if self.symmetric:
            if not self.signed and (mn >= 0).all():  # unsigned symmetric: [0, max]
                scale = mx / n
                zp = torch.zeros_like(scale)
            else:
                pos, neg = n // 2, (n + 1) // 2
                scale = torch.maximum(mx / pos, -mn / neg)
                zp = torch.full_like(scale, 0.0 if self.signed else float(round((qmin + qmax) / 2)))
        else:
            scale = (mx - mn) / n
            zp = torch.clamp(torch.round(qmin - mn / scale), qmin, qmax)
        scale = torch.clamp(scale, min=eps)
        self._store(scale, zp)

    def _store(self, scale, zp) -> None:
        dev = self.scale.device if self.scale is not None else scale.device
        scale, zp = scale.to(dev), zp.to(dev)
        if self.learn_range and self.dtype == "int":
            if isinstance(self.scale, nn.Parameter) and self.scale.shape == scale.shape:
                with torch.no_grad():
                    self.scale.copy_(scale)
                    self.zero_point.copy_(zp)
            else:
                self._buffers.pop("scale", None)
                self._buffers.pop("zero_point", None)
                self.scale = nn.Parameter(scale)
                self.zero_point = nn.Parameter(zp)
        else:
            self.scale, self.zero_point = scale, zp
        self.invalidate()

    def set_encoding(self, scale, zero_point) -> None:
        """Set scale and zero point directly (shapes as for rapidquant.ops)."""
        self._store(torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(zero_point, dtype=torch.float32))

    def get_range(self):
        """(min, max) of the grid the encoding represents."""
        if self.scale is None:
            return None
        qmin, qmax = self.qrange
        s, z = self.scale.detach(), self.zero_point.detach()
        return (qmin - z) * s, (qmax - z) * s

    @property
    def encoding(self) -> dict | None:
        """The encoding as plain Python values (None before calibration)."""
        base = {"dtype": self.dtype, "bitwidth": self.bitwidth, "enabled": self.enabled}
        if self.dtype == "float":
            base["format"] = self.float_format
            if self.scale is not None:
                base["scale"] = self.scale.detach().cpu().reshape(-1).tolist()
            return base
        if self.scale is None:
            return None
        qmin, qmax = self.qrange
        base.update(symmetric=self.symmetric, signed=self.signed, qmin=qmin, qmax=qmax,
                    axis=self.axis, block_size=self.block_size,
                    shape=list(self.scale.shape),
                    scale=self.scale.detach().cpu().reshape(-1).tolist(),
                    zero_point=[int(v) for v in self.zero_point.detach().cpu().reshape(-1).tolist()])
        return base

    # ------------------------------------------------------------ calibration
    def start_calibration(self) -> None:
        need_hist = self.scheme in HIST_SCHEMES
        self.observer = Observer(self.name, self.axis, self.block_size, histogram=need_hist,
                                 bins=self.bins, nonfinite=self.nonfinite)

    def finish_calibration(self) -> bool:
        """Turn collected statistics into an encoding. False when no data was seen."""
        obs, self.observer = self.observer, None
        if obs is None or obs.stats is None:
            return False
        self.stats = obs.stats
        if not self.frozen:
            self.compute_encoding()
        return True

    def drop_histogram(self) -> None:
        """Free the calibration histogram (a per-channel weight's is [channels, 2048] float64:
        280 MB over ImageNet MobileNetV2's convs); min/max stay. Recomputing the encoding
        with a histogram scheme then needs a new calibration."""
        if self.stats is not None:
            self.stats.hist = None

    def compute_encoding(self, scheme: str | None = None) -> None:
        """(Re)derive the encoding from the kept statistics, e.g. after a bitwidth change."""
        if self.stats is None:
            raise RuntimeError(f"quantizer '{self.name}' has no calibration statistics yet")
        if self.dtype == "float":
            self.set_range(self.stats.min, self.stats.max)
            return
        qmin, qmax = self.qrange
        mn, mx = encoding_range(self.stats, scheme or self.scheme, qmin, qmax, self.symmetric,
                                self.percentile, self.gamma)
        lo, hi = self.fixed_range
        mn = mn if lo is None else torch.full_like(torch.as_tensor(mn, dtype=torch.float32), lo)
        mx = mx if hi is None else torch.full_like(torch.as_tensor(mx, dtype=torch.float32), hi)
        self.set_range(mn, mx)

    # ------------------------------------------------------------ forward
    def forward(self, x, inplace: bool = False):
        """Quantize-dequantize x. ``inplace=True`` (used by QuantSim for op outputs nobody
        else holds) overwrites x when autograd does not need it."""
        if self.observer is not None:
            self.observer.update(x)
            return x
        if not self.enabled or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        if self.dtype == "float":
            fmt = FLOAT_FORMATS[self.float_format]
            if self.float_format in ("fp16", "bf16"):
                return self._float_op(x, fmt, None)
            if self.scale is None:
                raise RuntimeError(self._uncalibrated())
            return self._float_op(x, fmt, self.scale)
        if self.scale is None:
            raise RuntimeError(self._uncalibrated())
        qmin, qmax = self.qrange
        if self.scale.device != x.device:  # e.g. encodings loaded on CPU, model on GPU
            self._to(x.device)
        scale, zp = self.scale, self.zero_point
        if self.learn_range:
            # keep the learned encoding valid: positive scale, integer zero point in range
            scale = scale.clamp_min(min_scale(qmax - qmin))
            zp = torch.clamp(round_ste(zp), qmin, qmax)
        if named.active():  # ONNX export: the traced op carries this quantizer's name
            return named.quantize_dequantize(x, scale, zp, qmin, qmax, self.axis, self.block_size, name=self.name)
        if self.qdrop is not None:
            p, seed = self.qdrop
            return ops.quantize_dequantize_drop(x, scale, zp, qmin, qmax, p, seed, axis=self.axis,
                                                block_size=self.block_size)
        if inplace:
            return ops.quantize_dequantize_(x, scale, zp, qmin, qmax, axis=self.axis, block_size=self.block_size)
        return ops.quantize_dequantize(x, scale, zp, qmin, qmax, axis=self.axis, block_size=self.block_size)

    def _float_op(self, x, fmt, scale):
        if named.active():
            return named.float_quantize_dequantize(x, fmt, scale, self.axis if scale is not None else None,
                                                   name=self.name)
        if scale is None:
            return ops.float_quantize_dequantize(x, fmt)
        return ops.float_quantize_dequantize(x, fmt, scale=scale, axis=self.axis)

    def _to(self, device) -> None:
        for k in ("scale", "zero_point"):
            t = getattr(self, k)
            if isinstance(t, nn.Parameter):
                t.data = t.data.to(device)
            else:
                setattr(self, k, t.to(device))

    def _uncalibrated(self) -> str:
        return (f"quantizer '{self.name}' has no encoding: run sim.compute_encodings(data) or "
                "sim.load_encodings(path) first (or disable it)")

    def extra_repr(self) -> str:
        if self.dtype == "float":
            return f"{self.float_format}, enabled={self.enabled}"
        gran = "per-tensor" if self.axis is None else f"per-channel(axis={self.axis})"
        if self.block_size is not None:
            gran = f"per-block({self.block_size})"
        return (f"int{self.bitwidth}, {'symmetric' if self.symmetric else 'asymmetric'}, {gran}, "
                f"scheme={self.scheme}, enabled={self.enabled}, frozen={self.frozen}")


def apply_encoding_constraints(q: Quantizer, cons: dict) -> None:
    """A hardware config's encoding_constraints for an op's output: min and max fix the range
    (Sigmoid [0, 1]; the quantizer is frozen); only one of them fixes that end and the other
    comes from calibration (Softmax min 0)."""
    if not cons:
        return
    lo, hi = cons.get("min"), cons.get("max")
    q.fixed_range = (None if lo is None else float(lo), None if hi is None else float(hi))
    if lo is not None and hi is not None:
        q.set_range(torch.tensor(float(lo)), torch.tensor(float(hi)))
        q.frozen = True

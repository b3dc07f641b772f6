"""QuantSimConfig and the hardware config (AIMET's JSON schema, plus shipped presets)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from rapidquant.calibration import SCHEMES

PRESETS = {
    "default": "default.json",                   # per-tensor weights
    "default_per_channel": "default_per_channel.json",
    "w8a16": "w8a16.json",                       # per-channel weights, 16-bit activations
}
_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hw_configs")


@dataclass(frozen=True)
class QuantSimConfig:
    """How QuantSim quantizes a model.

    param_bw / act_bw: integer bitwidths (2..16), or 16 with dtype="float" for fp16.
    param_scheme / act_scheme: "minmax", "percentile", "mse", "sqnr" (AIMET's TF-enhanced)
    or "entropy". per_channel: None follows the hardware config; True/False overrides it
    for weights. hw_config: a preset name ("default", "default_per_channel", "w8a16"), a
    path to an AIMET-style JSON file, or a dict. block_size: per-block weight quantization
    (blocks along the input channels). dtype: "int" or "float" for all quantizers.
    """
    param_bw: int | None = None           # None: the hw config's default kernel, else 8
    act_bw: int | None = None
    param_scheme: str = "minmax"
    act_scheme: str = "minmax"
    percentile: float = 99.99
    sqnr_gamma: float = 3.0
    per_channel: bool | None = None
    param_symmetric: bool | None = None   # None: from the hardware config
    act_symmetric: bool | None = None
    hw_config: str | dict = "default_per_channel"
    dtype: str = "int"
    act_dtype: str | None = None          # overrides dtype for activations
    float_format: str | None = None       # "fp16", "bf16", "fp8_e4m3", "fp8_e5m2"
    block_size: int | None = None
    learn_range: bool = False             # scales/zero points become trainable (QAT)
    histogram_bins: int = 2048
    nonfinite: str = "raise"              # "raise" on NaN/Inf in calibration, or "ignore"
    exclude: tuple = field(default_factory=tuple)  # module names or types left in float
    strict: bool = False                  # modules QuantSim cannot quantize are an error, not float leaves
    capture: str = "auto"                 # "auto" (torch.fx, else torch.export), "fx" or "export"
    # integer activation grids that destroy their calibration data are raised to this many bits
    # after calibration (named in a warning and sim.widened); None: only warn
    widen_destroyed: int | None = 16
    # integer activations inside LSTM/GRU cells (gate pre-activations, gates, cell and hidden
    # states) get this many bits where the hw config runs them: 8-bit rounding there compounds
    # over the time steps (the coverage suite's 3-layer LSTM speaker encoder: 2.5 dB with 8-bit
    # cell activations, 8.9 dB with 16; integer LSTMs elsewhere keep 16-bit cell state too).
    # None: the act bitwidth. Named in sim.widened; AMP never narrows them
    recurrent_act_bw: int | None = 16

    def __post_init__(self):
        for name in ("param_scheme", "act_scheme"):
            if getattr(self, name) not in SCHEMES:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {SCHEMES}")
        for name in ("widen_destroyed", "recurrent_act_bw"):
            v = getattr(self, name)
            if v is not None and v not in range(2, 17):
                raise ValueError(f"{name}={v!r}: an integer bitwidth 2..16, or None")
        for name in ("dtype", "act_dtype"):
            v = getattr(self, name)
            if v is not None and v not in ("int", "float"):
                raise ValueError(f"{name} must be 'int' or 'float' (got {v!r})")
        if self.dtype == "int":
            for name in ("param_bw", "act_bw"):
                if getattr(self, name) is not None and not 2 <= getattr(self, name) <= 16:
                    raise ValueError(f"{name}={getattr(self, name)}: integer bitwidths are 2..16")
        if self.capture not in ("auto", "fx", "export"):
            raise ValueError(f"capture must be 'auto', 'fx' or 'export' (got {self.capture!r})")
        if self.nonfinite not in ("raise", "ignore"):
            raise ValueError("nonfinite must be 'raise' or 'ignore'")
        if not 50 <= self.percentile <= 100:
            raise ValueError(f"percentile must be in [50, 100] (got {self.percentile})")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError("block_size must be a positive int")


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v in ("True", "False", "true", "false"):
        return v.lower() == "true"
    raise ValueError(f"hardware config booleans are 'True'/'False' (got {v!r})")


_KNOWN_TOP = {"defaults", "params", "op_type", "supergroups", "model_input", "model_output",
              "supergroup_pass_list"}


def _reject_unsupported(raw: dict) -> None:
    """Fields of AIMET's schema that QuantSim does not implement: an error, never ignored."""
    ops = {"defaults.ops": raw["defaults"]["ops"], **{f"op_type.{k}": v for k, v in raw.get("op_type", {}).items()}}
    for where, op in ops.items():
        if _bool(op.get("is_input_quantized", "False")):
            raise ValueError(f"hardware config {where}: is_input_quantized=True is not supported (QuantSim "
                             "quantizes op outputs and the model input, model_input.is_input_quantized); "
                             "quantize the producer's output instead, or remove the field")
        unknown = set(op.get("encoding_constraints", {})) - {"min", "max"}
        if unknown:
            raise ValueError(f"hardware config {where}: encoding_constraints keys {sorted(unknown)} are not "
                             "supported; use min and/or max")
    if _bool(raw["defaults"].get("strict_symmetric", "False")):
        raise ValueError("hardware config defaults.strict_symmetric=True (a symmetric grid without its most "
                         "negative level) is not supported; set it to False")
    if raw.get("supergroup_pass_list"):
        raise ValueError(f"hardware config supergroup_pass_list {raw['supergroup_pass_list']} is not supported; "
                         "list the fused op sequences under supergroups instead")


@dataclass
class HwConfig:
    """A parsed hardware config, answering placement questions by ONNX op type."""
    raw: dict

    @classmethod
    def load(cls, spec: str | dict) -> "HwConfig":
        if isinstance(spec, dict):
            raw = spec
        elif spec in PRESETS:
            with open(os.path.join(_HERE, PRESETS[spec])) as f:
                raw = json.load(f)
        elif isinstance(spec, str) and os.path.isfile(spec):
            with open(spec) as f:
                raw = json.load(f)
        else:
            raise ValueError(f"hw_config {spec!r} is neither a preset ({', '.join(PRESETS)}), "
                             "an existing JSON file, nor a dict")
        unknown = set(raw) - _KNOWN_TOP
        if unknown:
            raise ValueError(f"hardware config has unknown sections {sorted(unknown)}; "
                             f"known: {sorted(_KNOWN_TOP)}")
        if "defaults" not in raw or "ops" not in raw["defaults"] or "params" not in raw["defaults"]:
            raise ValueError("hardware config needs defaults.ops and defaults.params (AIMET schema)")
        for sg in raw.get("supergroups", []):
            if len(sg.get("op_list", [])) < 2:
                raise ValueError(f"supergroup {sg} needs an op_list of at least two op types")
        _reject_unsupported(raw)
        return cls(raw)

    def _op(self, op_type: str) -> dict:
        return self.raw.get("op_type", {}).get(op_type, {})

    def output_quantized(self, op_type: str) -> bool:
        v = self._op(op_type).get("is_output_quantized", self.raw["defaults"]["ops"].get("is_output_quantized", "True"))
        return _bool(v)

    def act_symmetric(self, op_type: str) -> bool:
        v = self._op(op_type).get("is_symmetric", self.raw["defaults"]["ops"].get("is_symmetric", "False"))
        return _bool(v)

    def param_quantized(self, op_type: str, param: str) -> bool:
        v = self.raw["defaults"]["params"].get("is_quantized", "True")
        v = self.raw.get("params", {}).get(param, {}).get("is_quantized", v)
        v = self._op(op_type).get("params", {}).get(param, {}).get("is_quantized", v)
        return _bool(v)

    def param_symmetric(self, op_type: str, param: str) -> bool:
        v = self.raw["defaults"]["params"].get("is_symmetric", "True")
        v = self.raw.get("params", {}).get(param, {}).get("is_symmetric", v)
        v = self._op(op_type).get("params", {}).get(param, {}).get("is_symmetric", v)
        return _bool(v)

    def per_channel(self, op_type: str) -> bool:
        v = self._op(op_type).get("per_channel_quantization",
                                  self.raw["defaults"].get("per_channel_quantization", "False"))
        return _bool(v)

    def unsigned_symmetric(self) -> bool:
        return _bool(self.raw["defaults"].get("unsigned_symmetric", "False"))

    def encoding_constraints(self, op_type: str) -> dict:
        return self._op(op_type).get("encoding_constraints", {})

    def supergroups(self) -> list[list[str]]:
        return [sg["op_list"] for sg in self.raw.get("supergroups", [])]

    def model_input_quantized(self) -> bool:
        return _bool(self.raw.get("model_input", {}).get("is_input_quantized", "True"))

    def model_output_quantized(self) -> bool | None:
        v = self.raw.get("model_output", {}).get("is_output_quantized")
        return None if v is None else _bool(v)

    def supported_kernels(self, op_type: str | None = None) -> list[dict]:
        ks = self.raw["defaults"].get("supported_kernels", [])
        if op_type is not None:
            ks = self._op(op_type).get("supported_kernels", ks)
        return ks

    def runs_activation_bits(self, bitwidth: int, op_type: str | None = None) -> bool:
        """Whether the hardware runs activations of this bitwidth (for ``op_type`` when given;
        a config that lists no supported kernels constrains nothing)."""
        ks = self.supported_kernels(op_type)
        return not ks or any(k.get("activation", {}).get("bitwidth") == bitwidth for k in ks)

    def default_bitwidths(self) -> dict[str, Any] | None:
        ks = self.supported_kernels()
        return ks[0] if ks else None

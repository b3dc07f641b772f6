"""Encodings files: the rapidquant format and AIMET-compatible 1.0.0 / 2.0.0 schemas.

rapidquant format (``"format": "rapidquant-encodings"``, version 1): one record per
quantizer name with dtype, bitwidth, enabled, symmetric, signed, qmin/qmax, axis,
block_size, the scale/zero-point tensor shape and flat ``scale``/``zero_point`` lists
(ONNX convention: q = round(x / scale) + zero_point), plus ``onnx_tensor`` when written
by an export. AIMET files are keyed by ONNX tensor names; ours carry a
``"rapidquant": {"tensor_to_quantizer": ...}`` map so they load back into a sim.
"""
from __future__ import annotations

import json
import os
import warnings

import torch

import rapidquant
from rapidquant.export import aimet_import as A
from rapidquant.export.aimet_import import LoadReport

FORMATS = ("rapidquant", "1.0.0", "2.0.0")


def check_writable(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_json(obj, path: str) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # never leave a half-written file behind
    return path


def rapidquant_doc(sim, tensor_names: dict | None = None, int32_bias: dict | None = None) -> dict:
    recs = {}
    for name, q in sim.quantizers().items():
        enc = q.encoding
        rec = dict(enc) if enc is not None else {"dtype": q.dtype, "bitwidth": q.bitwidth, "enabled": q.enabled}
        rec["frozen"] = q.frozen
        tensors = _tensors_of(tensor_names, name)
        if tensors:
            rec["onnx_tensor"] = tensors[0]
        if len(tensors) > 1:  # a quantizer called more than once: one QuantizeLinear per call
            rec["onnx_tensors"] = tensors
        recs[name] = rec
    doc = {"format": "rapidquant-encodings", "version": 1,
           "producer": {"rapidquant": rapidquant.__version__, "torch": torch.__version__},
           "quantizers": recs}
    if int32_bias:
        doc["int32_bias"] = int32_bias
    return doc


def write_rapidquant(sim, path: str, overwrite: bool = False, tensor_names=None, int32_bias=None) -> str:
    check_writable(path, overwrite)
    return write_json(rapidquant_doc(sim, tensor_names, int32_bias), path)


def _onnx_dtype(qmin: int, qmax: int) -> str:
    for lo, hi, name in ((-8, 7, "int4"), (0, 15, "uint4"), (-128, 127, "int8"), (0, 255, "uint8"),
                         (-32768, 32767, "int16"), (0, 65535, "uint16")):
        if lo <= qmin and qmax <= hi:
            return name
    return "int32"


def _tensors_of(tensor_names: dict | None, name: str) -> list:
    """The ONNX tensors a quantizer quantizes (values may be one name or a list)."""
    t = (tensor_names or {}).get(name)
    return [] if t is None else ([t] if isinstance(t, str) else list(t))


def aimet_doc(sim, version: str, tensor_names: dict, int32_bias: dict | None = None) -> dict:
    """AIMET 1.0.0 or 2.0.0 encodings keyed by ONNX tensor names (enabled quantizers only).
    ``tensor_names``: quantizer -> the tensor (or tensors) its QuantizeLinear quantizes."""
    params = set(sim.param_quantizers())
    acts, prms, v2 = [], [], []
    t2q = {}
    for name, q in sim.quantizers().items():
        for t in _tensors_of(tensor_names, name):
            if not q.enabled or q.encoding is None:
                continue
            if t in t2q:  # a Q node shared by equal quantizers (torch.onnx merged them): one record
                t2q[t] = (t2q[t] if isinstance(t2q[t], list) else [t2q[t]]) + [name]
                continue
            t2q[t] = name
            _aimet_record(q, name in params, version, t, acts, prms, v2)
    producer = {"package": "rapidquant", "version": rapidquant.__version__}
    extra = {"rapidquant": {"tensor_to_quantizer": t2q}}
    if version == "1.0.0":
        doc = {"version": "1.0.0", "activation_encodings": acts, "param_encodings": prms,
               "excluded_layers": [], "quantizer_args": {"activation_bitwidth": sim.default_bitwidths()[1],
                                                         "param_bitwidth": sim.default_bitwidths()[0],
                                                         "dtype": sim.config.dtype,
                                                         "quant_scheme": sim.config.act_scheme}}
        if int32_bias:
            for t, b in int32_bias.items():
                doc["param_encodings"].append({"name": t, "dtype": "INT", "bw": 32, "is_sym": True,
                                               "enc_type": "PER_CHANNEL" if len(b["scale"]) > 1 else "PER_TENSOR",
                                               "scale": b["scale"], "offset": [-(2 ** 31)] * len(b["scale"])})
    else:
        if int32_bias:
            for t, b in int32_bias.items():
                rec = {"name": t, "output_dtype": "int32", "y_scale": b["scale"] if len(b["scale"]) > 1 else b["scale"][0]}
                if len(b["scale"]) > 1:
                    rec["axis"] = 0
                v2.append(rec)
        doc = {"version": "2.0.0", "producer": producer, "encodings": v2}
    doc.update(extra)
    return doc


def _aimet_record(q, is_param: bool, version: str, t: str, acts: list, prms: list, v2: list) -> None:
    e = q.encoding
    if q.dtype == "float":
        if version == "1.0.0":
            rec = {"name": t, "dtype": "FLOAT", "bw": q.bitwidth, "enc_type": "PER_TENSOR"}
            (prms if is_param else acts).append(rec)
        elif q.float_format in ("fp16", "bf16"):
            v2.append({"name": t, "output_dtype": {"fp16": "float16", "bf16": "bfloat16"}[q.float_format]})
        elif "scale" in e:
            v2.append({"name": t, "output_dtype": {"fp8_e4m3": "float8e4m3fn", "fp8_e5m2": "float8e5m2"}[q.float_format],
                       "y_scale": e["scale"] if len(e["scale"]) > 1 else e["scale"][0]})
        return
    qmin, qmax = e["qmin"], e["qmax"]
    per_block = q.block_size is not None
    per_ch = q.axis is not None and not per_block
    if version == "1.0.0":
        rec = {"name": t, "dtype": "INT", "bw": q.bitwidth, "is_sym": bool(q.symmetric),
               "enc_type": "PER_BLOCK" if per_block else ("PER_CHANNEL" if per_ch else "PER_TENSOR"),
               "scale": e["scale"], "offset": [qmin - z for z in e["zero_point"]]}
        if per_block:
            rec["block_size"] = q.block_size
        (prms if is_param else acts).append(rec)
    else:
        zps = e["zero_point"]
        rec = {"name": t, "output_dtype": _onnx_dtype(qmin, qmax),
               "y_scale": e["scale"] if (per_ch or per_block) else e["scale"][0]}
        if any(zps):
            rec["y_zero_point"] = zps if (per_ch or per_block) else zps[0]
        if per_ch or per_block:
            rec["axis"] = q.axis if not per_block else 1
        if per_block:
            rec["block_size"] = q.block_size
        v2.append(rec)


def load_into(sim, src, freeze: bool = True, strict: bool = True, onnx_model=None) -> LoadReport:
    """Load any supported encodings file (or dict) into a sim: rapidquant's format, or AIMET's
    0.6.1 / 1.0.0 / 2.0.0 files and ``_torch.encodings`` (placed through ``onnx_model``, by
    default the .onnx written beside the file; see export/aimet_import.py). Quantizers the
    file does not list are disabled: the file's model does not quantize there. Records no
    quantizer matches raise (``strict``) or are warned about; the report says what went where."""
    doc, path = src, None
    if not isinstance(src, dict):
        path = os.fspath(src)
        with open(path) as f:
            doc = json.load(f)
    qs = sim.quantizers()
    if doc.get("format") == "rapidquant-encodings":
        recs = doc["quantizers"]
        if strict:
            missing, extra = sorted(set(qs) - set(recs)), sorted(set(recs) - set(qs))
            if missing or extra:
                raise KeyError(f"encodings do not match this sim: missing {missing[:8]}, unexpected {extra[:8]} "
                               "(pass strict=False to load the overlap)")
        for name, rec in recs.items():
            if name in qs:
                _apply_record(qs[name], rec, freeze)
        return LoadReport(placed={n: [n] for n in recs if n in qs}, unplaced=[n for n in recs if n not in qs])
    kind, recs = A.records(doc)
    t2q = doc.get("rapidquant", {}).get("tensor_to_quantizer")
    if t2q is not None:  # written by rapidquant: the map says where each tensor's quantizer is
        where = {n: _names(t2q.get(n)) or "unplaced" for n in recs}
    else:
        if onnx_model is None and path is not None:
            onnx_model = A.sibling_onnx(path)
        if isinstance(onnx_model, (str, os.PathLike)):
            import onnx
            onnx_model = onnx.load(os.fspath(onnx_model), load_external_data=False)
        where = A.placements(sim, kind, recs, onnx_model)
    report = _apply_placed(qs, recs, where, freeze)
    if report.unplaced:
        hint = "" if (t2q is not None or onnx_model is not None or kind == "module") else (
            " (pass onnx_model=, the .onnx AIMET exported with this file, to place tensors by the graph)")
        msg = (f"{len(report.unplaced)} encodings match no quantizer of this sim: {report.unplaced[:8]}{hint}; "
               "pass strict=False to load the rest")
        if strict:
            raise KeyError(msg)
        warnings.warn(msg.replace("; pass strict=False to load the rest", "; loaded the rest"), stacklevel=3)
    return report


def _apply_placed(qs: dict, recs: dict, where: dict, freeze: bool) -> LoadReport:
    report, done, pending = LoadReport(), {}, []
    for name, enc in recs.items():
        w = where.get(name, "unplaced")
        if w == "derived":
            report.derived.append(name)
            continue
        targets = [] if isinstance(w, str) else [q for q in w if q in qs]
        if not targets:
            pending.append(name)
            continue
        for qn in targets:
            if qn in done:  # a second record for one quantizer: a copy AIMET propagated, or a clash
                if done[qn] != enc:
                    pending.append(name)
                continue
            _apply_encoding(qs[qn], enc, freeze)
            done[qn] = enc
        report.placed[name] = targets
    for name in pending:  # an encoding copied onto a data-movement output needs no quantizer
        (report.derived if recs[name] in done.values() else report.unplaced).append(name)
    for qn, q in qs.items():
        if qn not in done and q.enabled:
            q.enabled = False
            report.disabled.append(qn)
    return report


def _apply_encoding(q, enc: A.Encoding, freeze: bool) -> None:
    q.frozen = False
    if enc.dtype == "float":
        if q.precision() != ("float", enc.bitwidth, enc.float_format):
            q.set_dtype("float", enc.bitwidth, enc.float_format)
        if enc.scale:
            scale = _shaped(q, enc.scale)
            q.set_encoding(scale, torch.zeros_like(scale))
    else:
        if q.dtype != "int" or q.bitwidth != enc.bitwidth:
            q.set_dtype("int", enc.bitwidth)
        q.symmetric, q.signed = enc.symmetric, enc.signed
        if len(enc.scale) > 1 and q.axis is None:
            q.axis = enc.axis if enc.axis is not None else 0
        elif len(enc.scale) == 1 and q.block_size is None:
            q.axis = None
        scale = _shaped(q, enc.scale)
        q.set_encoding(scale, torch.tensor(enc.zero_point, dtype=torch.float32).reshape(scale.shape))
    q.enabled = True
    q.frozen = freeze


def _names(v) -> list:
    """tensor_to_quantizer values: one quantizer name, or a list when quantizers share a Q node."""
    return [] if v is None else ([v] if isinstance(v, str) else list(v))


def _shaped(q, values) -> torch.Tensor:
    """Scale values in the quantizer's current shape (or flat / scalar before calibration)."""
    t = torch.tensor(values, dtype=torch.float32)
    if q.scale is not None and q.scale.numel() == t.numel():
        return t.reshape(q.scale.shape)
    return t.reshape(()) if t.numel() == 1 else t.reshape(-1)


def _apply_record(q, rec: dict, freeze: bool) -> None:
    q.enabled = rec.get("enabled", True)
    q.frozen = False  # the record's encoding replaces whatever was frozen
    if rec.get("dtype", "int") != q.dtype or rec.get("bitwidth") != q.bitwidth:
        q.set_dtype(rec.get("dtype", "int"), rec["bitwidth"], rec.get("format"))
    if "symmetric" in rec:
        q.symmetric = rec["symmetric"]
        q.signed = rec["signed"]
    if "scale" in rec:
        shape = rec.get("shape", [])
        scale = torch.tensor(rec["scale"], dtype=torch.float32).reshape(shape)
        zp = torch.tensor(rec.get("zero_point", [0] * len(rec["scale"])), dtype=torch.float32).reshape(shape)
        q.set_encoding(scale, zp)
    q.frozen = freeze or rec.get("frozen", False)

"""torch.onnx's table of torchlib translations, built once per opset instead of per export.

torch.onnx (the dynamo exporter) rebuilds its ONNXRegistry from torchlib on every call:
0.4 s on this project's 2-core machine, a quarter of a small CNN's whole export, paid by
every AutoQuant artifact check. Inside :func:`cached_torchlib_registry` the first build per
opset is kept and every export gets its own copy of it (the exporter registers our custom
translations into the copy, so the kept table never changes).

This reaches into torch.onnx's private ``_registration`` module; where that module or the
attributes used here are missing (another torch version), nothing is patched and exports
build their table as before.
"""
from __future__ import annotations

import contextlib
import threading

_KEPT: dict = {}  # opset -> the pristine registry
_LOCK = threading.RLock()
_DEPTH = [0]  # patched while > 0 (nested and threaded exports)


def _copy(base):
    new = type(base)()
    new.__dict__.update(vars(base))
    new.functions = {k: list(v) for k, v in base.functions.items()}
    return new


@contextlib.contextmanager
def cached_torchlib_registry():
    try:
        from torch.onnx._internal.exporter import _registration as R
        cls = R.ONNXRegistry
        current = cls.__dict__["from_torchlib"]
        original = getattr(current.__func__, "torch_original", current)  # never our own wrapper
        probe = cls()
        if not (isinstance(probe.functions, dict) and hasattr(probe, "_opset_version")):
            raise AttributeError("ONNXRegistry layout changed")
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(klass, opset_version=None):
        key = opset_version if opset_version is not None else probe._opset_version
        with _LOCK:
            if key not in _KEPT:
                _KEPT[key] = original.__func__(klass, key)
            return _copy(_KEPT[key])
    from_torchlib.torch_original = original

    with _LOCK:
        if _DEPTH[0] == 0:
            cls.from_torchlib = classmethod(from_torchlib)
        _DEPTH[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                cls.from_torchlib = original

"""Stand-in for torchvision, which has no wheel that imports beside torch 2.13's CPU build.
aimet-torch imports it at module level (transforms, datasets, ...) but the suite never calls
it: any attribute is a fresh placeholder class. Only bench/suite/aimet.py puts this on sys.path,
and only when the real torchvision does not import."""
import sys as _sys
import types as _types

__version__ = "0.0.0+stub"


class _Stub(_types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (), {})
        setattr(self, name, cls)
        return cls


for _name in ("datasets", "transforms", "models", "ops", "io", "utils", "models.detection", "ops.boxes"):
    _mod = _Stub(f"torchvision.{_name}")
    _sys.modules[f"torchvision.{_name}"] = _mod
    if "." not in _name:
        globals()[_name] = _mod

"""The same configurations through aimet-torch, when it is importable (bench/README.md says
how to install it beside rapidquant). Every function returns (model to evaluate, seconds)."""
from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import tempfile
import time

import torch

_STUB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_stub")


def _import():
    import importlib.util
    if importlib.util.find_spec("aimet_torch") is None:
        return ModuleNotFoundError("no module named aimet_torch")
    try:
        import torchvision  # noqa: F401  (aimet-torch imports it at module level)
    except Exception:
        sys.path.insert(0, _STUB)  # torchvision has no wheel for this torch: a stub satisfies the imports
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]
    try:
        with _quiet():
            import aimet_torch  # noqa: F401
            from aimet_torch.quantsim import QuantizationSimModel  # noqa: F401
        return aimet_torch
    except Exception as e:  # noqa: BLE001 (any import failure means: no comparison)
        return e


_AIMET = None


@contextlib.contextmanager
def _quiet():
    """AIMET prints logs and progress bars; the suite's output is its table."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def available():
    """aimet_torch's version, or None (with the reason in why())."""
    global _AIMET
    if _AIMET is None:
        _AIMET = _import()
    return getattr(_AIMET, "__version__", "unknown") if not isinstance(_AIMET, Exception) else None


def why() -> str:
    available()
    return f"aimet-torch not importable ({type(_AIMET).__name__}: {_AIMET})" if isinstance(_AIMET, Exception) else ""


def _config(per_channel: bool) -> str:
    import aimet_torch
    d = os.path.join(os.path.dirname(aimet_torch.__file__), "common", "quantsim_config")
    return os.path.join(d, "default_config_per_channel.json" if per_channel else "default_config.json")


def _args(b):
    return b if isinstance(b, (tuple, list)) else (b,)


def _calibrate(sim, calib):
    import torch

    def fwd(m):
        with torch.no_grad():
            for b in calib:
                m(*_args(b))
    sim.compute_encodings(fwd)


def prepare(model, dummy, fold=False, cle=False):
    """BN fold and/or CLE on a copy (AIMET's CLE folds BNs itself)."""
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.cross_layer_equalization import equalize_model
    m = copy.deepcopy(model).eval()
    with _quiet():
        if cle:
            equalize_model(m, dummy_input=dummy)
        elif fold:
            fold_all_batch_norms(m, None, dummy_input=dummy)
    return m


def quantsim(model, dummy, calib, param_bw=8, act_bw=8, per_channel=True, fold=False, cle=False,
             param_encodings=None):
    """AIMET QuantSim (min-max ranges, its default hw config), calibrated on the same batches."""
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel
    t0 = time.perf_counter()
    m = prepare(model, dummy, fold, cle) if (fold or cle) else copy.deepcopy(model).eval()
    with _quiet():
        sim = QuantizationSimModel(m, dummy, quant_scheme=QuantScheme.min_max, default_output_bw=act_bw,
                                   default_param_bw=param_bw, config_file=_config(per_channel))
        if param_encodings:
            sim.set_and_freeze_param_encodings(param_encodings)
        _calibrate(sim, calib)
    return sim.model, time.perf_counter() - t0


def adaround(model, dummy, calib, param_bw, per_channel, iterations, num_batches, act_bw=8, cle=False):
    """BN fold (or CLE), AdaRound the weights, then a calibrated QuantSim with them frozen."""
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.common.defs import QuantScheme
    t0 = time.perf_counter()
    m = prepare(model, dummy, fold=True, cle=cle)
    with tempfile.TemporaryDirectory() as d, _quiet():
        params = AdaroundParameters(list(calib), num_batches=min(num_batches, len(calib)),
                                    default_num_iterations=iterations,
                                    forward_fn=lambda mod, b: mod(*_args(b)))
        m = Adaround.apply_adaround(m, dummy, params, d, "ada", default_param_bw=param_bw,
                                    default_quant_scheme=QuantScheme.min_max,
                                    default_config_file=_config(per_channel))
        model_q, _ = quantsim(m, dummy, calib, param_bw, act_bw, per_channel,
                              param_encodings=os.path.join(d, "ada.encodings"))
    return model_q, time.perf_counter() - t0


def teach_minilm():
    """AIMET refuses modules it has no quantized definition for: give it one for MiniLM's
    masked softmax (quantized output, the mask input left alone), as its docs prescribe."""
    from aimet_torch.nn import QuantizationMixin
    from rapidquant.zoo.minilm import MaskedSoftmax
    if getattr(MaskedSoftmax, "_aimet_taught", False):
        return

    @QuantizationMixin.implements(MaskedSoftmax)
    class QuantizedMaskedSoftmax(QuantizationMixin, MaskedSoftmax):
        def __quant_init__(self):
            super().__quant_init__()
            self.input_quantizers = torch.nn.ModuleList([None, None])
            self.output_quantizers = torch.nn.ModuleList([None])

        def forward(self, scores, key_mask):
            if self.input_quantizers[0] is not None:
                scores = self.input_quantizers[0](scores)
            out = super().forward(scores, key_mask)
            return out if self.output_quantizers[0] is None else self.output_quantizers[0](out)

    MaskedSoftmax._aimet_taught = True


def absent(what: str):
    """The column's text for a technique this aimet-torch lacks (None when aimet is absent)."""
    return f"n/a: {what} not in aimet-torch {available()}" if available() else None


def run(fn, score_fn):
    """(score, seconds) of an AIMET configuration, or a short reason it could not run."""
    if not available():
        return None
    try:
        model, seconds = fn()
        return score_fn(model), seconds
    except Exception as e:  # noqa: BLE001 (a failing competitor is reported, not fatal)
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"

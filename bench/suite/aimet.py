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


def _calibrate_model(m, calib):
    with torch.no_grad():
        for b in calib:
            m(*_args(b))


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


def make_sim(model, dummy, calib, param_bw=8, act_bw=8, per_channel=True, fold=False, cle=False,
             param_encodings=None):
    """AIMET QuantSim (min-max ranges, its default hw config), calibrated on the same batches:
    (sim, seconds)."""
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel
    t0 = time.perf_counter()
    m = prepare(model, dummy, fold, cle) if (fold or cle) else copy.deepcopy(model).eval()
    with _quiet():
        sim = QuantizationSimModel(m, dummy, quant_scheme=QuantScheme.min_max, default_output_bw=act_bw,
                                   default_param_bw=param_bw, config_file=_config(per_channel))
        if param_encodings:
            sim.set_and_freeze_param_encodings(param_encodings)
        sim.compute_encodings(lambda m: _calibrate_model(m, calib))
    return sim, time.perf_counter() - t0


def quantsim(*args, **kwargs):
    """make_sim's (sim.model, seconds)."""
    sim, seconds = make_sim(*args, **kwargs)
    return sim.model, seconds


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


def _loader(calib):
    """AIMET's AutoQuant and AMP want a DataLoader: this one yields our batches unchanged
    (batch_size None, so AIMET counts each batch as one sample)."""
    from torch.utils.data import DataLoader
    return DataLoader(list(calib), batch_size=None)


def _candidates(names):
    """["W8A8", "W16A16"] -> AIMET's ((act_bw, int), (param_bw, int)) tuples."""
    import re
    from aimet_torch.common.defs import QuantizationDataType as D
    wa = [tuple(map(int, re.fullmatch(r"W(\d+)A(\d+)", n).groups())) for n in names]
    return [((a, D.int), (w, D.int)) for w, a in wa]


def bias_correction(model, dummy, calib, param_bw=8, act_bw=8, per_channel=False):
    """CLE, AIMET's empirical bias correction of every conv/linear (on all calibration samples),
    then a calibrated sim."""
    from torch.utils.data import DataLoader, TensorDataset
    from aimet_torch._base.quantsim import QuantParams
    from aimet_torch.bias_correction import correct_bias
    from aimet_torch.common.defs import QuantScheme
    t0 = time.perf_counter()
    m = prepare(model, dummy, cle=True)
    x = torch.cat(calib)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=len(calib[0]))  # it wants (input, label)
    with _quiet():
        correct_bias(m, QuantParams(param_bw, act_bw, "nearest", QuantScheme.min_max, _config(per_channel)),
                     len(x), loader, len(x))
    model_q, _ = quantsim(m, dummy, calib, param_bw, act_bw, per_channel)
    return model_q, time.perf_counter() - t0


def autoquant(model, dummy, calib, evaluate, param_bw, per_channel, allowed_drop, iterations, num_batches,
              amp_candidates=None, proxy_batches=1, prepare=True):
    """AIMET's AutoQuant (its range-scheme search over min-max, TF-enhanced and percentile, BN
    fold, CLE, AdaRound, then AMP when candidates are given): returns (its score, seconds).
    prepare=False skips its model preparer (an fx trace that fails on models reading a
    tensor's dtype in forward, e.g. a masked softmax's fill value), as its QuantSim here."""
    from aimet_torch.adaround.adaround_weight import AdaroundParameters
    from aimet_torch import auto_quant
    t0 = time.perf_counter()
    loader = _loader(calib)
    cls = auto_quant.AutoQuantWithAutoMixedPrecision if amp_candidates else auto_quant.AutoQuant
    with tempfile.TemporaryDirectory() as d, _quiet():
        aq = cls(copy.deepcopy(model).eval(), dummy, loader, lambda m, n=None: evaluate(m),
                 param_bw=param_bw, output_bw=8, config_file=_config(per_channel), results_dir=d,
                 model_prepare_required=prepare)
        aq.set_adaround_params(AdaroundParameters(loader, num_batches=min(num_batches, len(calib)),
                                                  default_num_iterations=iterations,
                                                  forward_fn=lambda mod, b: mod(*_args(b))))
        if amp_candidates:
            aq.set_mixed_precision_params(_candidates(amp_candidates),
                                          num_samples_for_phase_1=proxy_batches,
                                          num_samples_for_phase_2=None)
        _, score, *_ = aq.optimize(allowed_drop)
    if score is None:  # AIMET gives up when even W32 (activations only) misses the target
        return "no result: W32 misses the target, AIMET stops", time.perf_counter() - t0
    return score, time.perf_counter() - t0


def amp(model, dummy, calib, evaluate, candidates, allowed_drop, proxy_batches, per_channel=False, cle=False):
    """AIMET's choose_mixed_precision on a min-max sim at the first candidate, phase 1 scored by
    output SQNR on `proxy_batches` batches (as ours), phase 2 by `evaluate`."""
    from aimet_torch.common.defs import CallbackFunc
    from aimet_torch.mixed_precision import choose_mixed_precision
    from aimet_torch._base.amp.mixed_precision_algo import EvalCallbackFactory
    t0 = time.perf_counter()
    w, a = (int(v) for v in candidates[0][1:].split("A"))
    sim, _ = make_sim(model, dummy, calib, w, a, per_channel, cle=cle)
    loader = _loader(calib)
    with tempfile.TemporaryDirectory() as d, _quiet():
        choose_mixed_precision(
            sim, dummy, _candidates(candidates),
            EvalCallbackFactory(loader).sqnr(proxy_batches),
            CallbackFunc(lambda m, _: evaluate(m)), allowed_drop, d, True,
            CallbackFunc(lambda m, _: _calibrate_model(m, calib)), use_all_amp_candidates=True)
    return sim.model, time.perf_counter() - t0


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


KINDS = ("quantsim", "bias_correction", "adaround", "autoquant", "amp")
SELECTED = set(KINDS)  # run_suite.py --aimet narrows it
REQUIRES = {"autoquant": ("aimet_torch.auto_quant", "AutoQuant"),  # gone after 2.30
            "bias_correction": ("aimet_torch.bias_correction", "bias correction")}  # gone in 2.42


def run(kind, fn, score_fn=None):
    """(score, seconds) of an AIMET configuration of `kind`, or a short reason it could not run
    (None: no column). `fn` returns (model, seconds) to be scored by `score_fn`, or (score,
    seconds) without one."""
    if not available() or kind not in SELECTED:
        return None
    if kind in REQUIRES:
        import importlib.util
        module, what = REQUIRES[kind]
        if importlib.util.find_spec(module) is None:
            return absent(what)
    try:
        out, seconds = fn()
        if isinstance(out, str):
            return out
        return (out if score_fn is None else score_fn(out)), seconds
    except Exception as e:  # noqa: BLE001 (a failing competitor is reported, not fatal)
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"

"""aimet-torch's own AdaRound for bench_adaround.py, run in aimet-torch's environment:

    V/bin/python bench/aimet_worker.py SPEC.json

It imports neither rapidquant nor bench/: bench_adaround.py writes what it needs to a folder
and names it in SPEC.json (keys below), then reads the JSON this writes to spec["out"].

  model_source  a .py file that defines the architecture with plain torch (a copy of
                rapidquant/zoo/digits.py, which imports only torch)
  class         the class to build from it
  model_file    torch.save({"state_dict", "identity": names of modules that BN folding
                replaced with nn.Identity, "biased": names of conv/linear layers that have
                a bias after folding})
  data_file     torch.save({"adaround": [batches], "calib": [batches], "x_test", "y_test",
                "fp_logits": the float model's logits on x_test, computed by the bench})
  param_bw, act_bw, num_batches, iterations (per layer; null: AIMET's own default), threads

Everything else is AIMET's default: model_preparer.prepare_model (its documented first step,
so the residual adds and flatten become quantizable modules), Adaround.apply_adaround with its
default quant scheme (TF-enhanced weight ranges) and default config (per-channel weights in
2.42), AdaroundParameters' default regularization, beta range and warm start (and, inside,
Adam at its default lr 1e-3 on 32-row batches), then a QuantizationSimModel with its default
quant scheme (min-max), the AdaRound weight encodings set and frozen, compute_encodings on the
calibration batches. Only apply_adaround is timed.

Before timing, the rebuilt float model (and the prepared one) must reproduce the bench's float
logits; after, the sim's weight quantizers must be AdaRound's frozen per-channel grids and the
weights the sim computes with must differ from round-to-nearest somewhere. Any failure raises
(the bench reports the row as failed).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import sys
import tempfile
import time


def _load_model(spec, torch, nn):
    s = importlib.util.spec_from_file_location("bench_model_source", spec["model_source"])
    mod = importlib.util.module_from_spec(s)
    s.loader.exec_module(mod)
    saved = torch.load(spec["model_file"], weights_only=True)
    model = getattr(mod, spec["class"])()
    for name in saved["identity"]:  # BN folding replaced these with Identity
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    for name in saved["biased"]:  # and gave these layers a bias
        m = model.get_submodule(name)
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.weight.shape[0]))
    model.load_state_dict(saved["state_dict"], strict=True)
    return model.eval()


def _same_logits(what, model, x, ref, torch):
    with torch.no_grad():
        out = model(x)
    out = out.as_subclass(torch.Tensor) if type(out) is not torch.Tensor else out
    diff = (out - ref).abs().max().item()
    if not torch.equal(out, ref):
        raise AssertionError(f"{what} does not reproduce the bench's float logits (max |diff| {diff:.3g})")
    return diff


def _plain(t, torch):
    """AIMET's quantizers return tensor subclasses: their dequantized values as a torch.Tensor."""
    if hasattr(t, "dequantize") and type(t) is not torch.Tensor:
        t = t.dequantize()
    return t.as_subclass(torch.Tensor).detach()


def _sqnr_db(q, f):
    err = float(((q - f) ** 2).sum())
    return float("inf") if err == 0 else 10 * math.log10(float((f ** 2).sum()) / err)


def main():
    spec = json.load(open(sys.argv[1]))
    import torch
    from torch import nn
    torch.set_num_threads(spec["threads"])
    log = io.StringIO()  # AIMET logs and progress bars; kept for the error report
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        import aimet_torch
        from aimet_torch.adaround import Adaround, AdaroundParameters
        from aimet_torch.model_preparer import prepare_model
        from aimet_torch.quantsim import QuantizationSimModel
    data = torch.load(spec["data_file"], weights_only=True)
    x_test, y_test, fp = data["x_test"], data["y_test"], data["fp_logits"]
    model = _load_model(spec, torch, nn)
    _same_logits("the rebuilt float model", model, x_test, fp, torch)
    dummy = data["adaround"][0]
    res = {"aimet_version": aimet_torch.__version__, "torch_version": torch.__version__}
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
                tempfile.TemporaryDirectory() as d:
            prepared = prepare_model(model)
            _same_logits("the model after AIMET's prepare_model", prepared, x_test, fp, torch)
            params = AdaroundParameters(data["adaround"], num_batches=spec["num_batches"],
                                        default_num_iterations=spec["iterations"])
            torch.manual_seed(0)
            t0 = time.perf_counter()
            ada = Adaround.apply_adaround(prepared, dummy, params, path=d, filename_prefix="adaround",
                                          default_param_bw=spec["param_bw"])
            res["adaround_seconds"] = time.perf_counter() - t0
            sim = QuantizationSimModel(ada, dummy, default_output_bw=spec["act_bw"],
                                       default_param_bw=spec["param_bw"])
            sim.set_and_freeze_param_encodings(os.path.join(d, "adaround.encodings"))

            def calibrate(m, _=None):
                with torch.no_grad():
                    for b in data["calib"]:
                        m(b)

            sim.compute_encodings(calibrate, None)
            with torch.no_grad():
                logits = _plain(sim.model(x_test), torch)
            res.update(_check_rounding(prepared, sim, spec, torch))
    except BaseException:
        sys.stderr.write(log.getvalue()[-4000:])
        raise
    res["accuracy"] = (logits.argmax(1) == y_test).float().mean().item()
    res["logit_sqnr_db"] = _sqnr_db(logits, fp)
    with open(spec["out"], "w") as f:
        json.dump(res, f, indent=1)


def _check_rounding(fp_model, sim, spec, torch):
    """The sim's weight quantizers hold AdaRound's frozen per-channel grids at the requested
    bitwidth, and the weights the sim computes with differ from round-to-nearest somewhere.
    Returns counts for the result.

    AIMET folds the learned rounding into the returned weights with its *soft* rounding
    (floor + h(alpha), adaround_weight.py), so weights whose alpha has not settled lie between
    two grid points; the frozen quantizer rounds them to the nearer one, which is the hard
    rounding (h >= 0.5 exactly when alpha >= 0). Those are counted ("soft"), not refused."""
    from aimet_torch.adaround.adaround_weight import AdaroundSupportedModules
    layers = flipped = soft = total = 0
    for name, fm in fp_model.named_modules():
        if not isinstance(fm, AdaroundSupportedModules):
            continue
        qm = sim.model.get_submodule(name)
        q = qm.param_quantizers["weight"]
        if q is None:
            raise AssertionError(f"{name}: AIMET's sim has no weight quantizer")
        if q.bitwidth != spec["param_bw"] or q.shape[0] != fm.weight.shape[0] or q.is_overwrite_allowed():
            raise AssertionError(f"{name}: weight quantizer is {q.bitwidth} bits, shape {tuple(q.shape)}, "
                                 f"frozen {not q.is_overwrite_allowed()}: not the frozen per-channel AdaRound grid")
        w = qm.weight.detach().as_subclass(torch.Tensor)
        tol = 1e-5 * w.abs().max()
        with torch.no_grad():
            used = _plain(q(w), torch)                     # what the sim computes with
            nearest = _plain(q(fm.weight.detach()), torch)  # round-to-nearest on the same grid
        soft += int(((used - w).abs() > tol).sum())
        flipped += int(((nearest - used).abs() > tol).sum())
        total += w.numel()
        layers += 1
    if not layers or not flipped:
        raise AssertionError(f"AIMET's AdaRound changed no rounding ({flipped} of {total} weights, {layers} layers)")
    iters = spec["iterations"]
    if iters is None:  # AIMET's default: 15000 below 8-bit weights, else 10000 (adaround_weight.py)
        iters = 15000 if spec["param_bw"] < 8 else 10000
    return {"layers": layers, "flipped": flipped, "soft": soft, "weights": total, "iterations_per_layer": iters,
            "iterations": iters * layers}


if __name__ == "__main__":
    main()

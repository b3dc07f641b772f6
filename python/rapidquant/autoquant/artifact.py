"""Accept on the artifact: export a candidate and score the exported ONNX model in
onnxruntime (default session options) with the user's own eval_fn.

What the user deploys is the file, so the file's score decides "met". When eval_fn cannot
take the onnxruntime module (it reads attributes of the torch model, or the export has
fixed shapes the evaluation does not use), the sim's score stands and the result says
loudly that the file was checked only for parity (it loads, and matches the sim on the
dummy input).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict

import torch

from rapidquant import distributed as D
from rapidquant.batches import call_model


def _on_main(fn):
    """fn() on rank 0, its result on every rank (one export, one set of files)."""
    value = fn() if D.is_main() else None
    return D.gather_objects(value)[0] if D.active() else value


def check(state, sim, folder: str) -> dict:
    """Export ``sim`` into ``folder`` and score the file. Returns a plain dict: onnx,
    encodings, ort_ok, parity figures, score (None when not scored), parity_only, why."""
    return _on_main(lambda: _check(state, sim, folder))


def _check(state, sim, folder: str) -> dict:
    from rapidquant.export import OnnxRuntimeModule
    os.makedirs(folder, exist_ok=True)
    info = {"folder": folder, "score": None, "parity_only": False, "why": ""}
    try:
        out = sim.export(folder, state.dummy_input, "model", overwrite=True)
    except Exception as e:  # noqa: BLE001 - an export failure is an outcome: nothing to deploy
        info.update(error=f"export failed: {type(e).__name__}: {e}", ort_ok=False)
        return info
    info.update(onnx=out.onnx, encodings=out.encodings, ort_ok=bool(out.ort_ok),
                ort_max_abs_diff=out.ort_max_abs_diff, qdq_pairs=out.qdq_pairs,
                parity={level: asdict(p) for level, p in out.parity.items()},
                ort_errors=dict(out.ort_errors), unmapped=list(out.unmapped))
    if not out.ort_ok:
        info["error"] = "the exported model does not run in onnxruntime"
        return info
    if not state.config.verify_artifact:
        info.update(parity_only=True, why="verify_artifact=False")
        return info
    try:
        with torch.no_grad():
            like = call_model(sim.model.eval(), state.dummy_input, sim.n_inputs)
        module = OnnxRuntimeModule(out.onnx, output_like=like)
        info["score"] = state.evaluator(module, "the exported ONNX model in onnxruntime")
    except Exception as e:  # noqa: BLE001 - eval_fn may not accept a non-torch module
        why = f"eval_fn could not score the onnxruntime module ({type(e).__name__}: {e})"
        info.update(parity_only=True, why=why)
        warnings.warn(f"AutoQuant: {why}; the reported score is the sim's, and the exported file was checked "
                      "only for parity with the sim on the dummy input", stacklevel=2)
    return info

"""The stage cache: completed stages on disk, so a rerun resumes where the last one stopped.

The key covers everything that changes a stage's result: the model's weights, the
calibration data, the whole config (the nested QuantSimConfig and AdaRound config
included, and the user's eval fingerprint) and the package version. Budgets, strictness,
export and the results folder do not change a stage's result and are left out.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch

from rapidquant import distributed as D
from rapidquant.autoquant.state import Outcome, StageRecord
from rapidquant.fingerprint import data_hash, model_hash, obj_hash

_NOT_IN_KEY = ("results_dir", "time_budget_s", "max_evaluations", "strict", "export", "predict_samples")


def cache_key(model, batches, config, flow=()) -> str:
    """flow: the pipeline's (stage, description) pairs: a cache written by another flow (a
    stage moved or changed what it scores) is not reused."""
    from rapidquant import __version__
    cfg = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_KEY}
    return obj_hash({"model": model_hash(model), "data": data_hash(batches), "config": cfg, "version": __version__,
                     "flow": [list(f) for f in flow]})


class StageCache:
    """``results_dir/cache/<key>/<stage>.{json,model.pt,encodings.json}``; rank 0 writes."""

    def __init__(self, results_dir: str, key: str):
        self.dir = os.path.join(results_dir, "cache", key)
        self.key = key

    def _path(self, name: str, suffix: str) -> str:
        return os.path.join(self.dir, f"{name}.{suffix}")

    def record(self, name: str) -> StageRecord | None:
        """The completed stage's record, or None when it has not completed before."""
        path = self._path(name, "json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            rec = StageRecord(**json.load(f))
        return rec if rec.status in ("ok", "met") else None

    def save(self, rec: StageRecord, out: Outcome) -> None:
        if not D.is_main():
            return  # one set of files, written by rank 0
        os.makedirs(self.dir, exist_ok=True)
        if out.model is not None:  # the whole module: a stage may change its structure
            _atomic(self._path(rec.name, "model.pt"), lambda p: torch.save(out.model, p))
        if out.sim is not None:
            out.sim.save_encodings(self._path(rec.name, "encodings.json"), overwrite=True)
            frozen = [n for n, q in out.sim.quantizers().items() if q.frozen]
            _atomic(self._path(rec.name, "frozen.json"), lambda p: _dump(frozen, p))
        _atomic(self._path(rec.name, "outcome.json"),
                lambda p: _dump({"candidate": out.candidate, "artifacts": out.artifacts}, p))
        _atomic(self._path(rec.name, "json"), lambda p: _dump(asdict(rec), p))

    def restore(self, rec: StageRecord, state, build_sim) -> Outcome:
        """Rebuild a completed stage's Outcome; build_sim(model) makes an uncalibrated sim."""
        with open(self._path(rec.name, "outcome.json")) as f:
            meta = json.load(f)
        model = None
        if os.path.exists(self._path(rec.name, "model.pt")):
            model = torch.load(self._path(rec.name, "model.pt"), weights_only=False).eval()
        sim = None
        if os.path.exists(self._path(rec.name, "encodings.json")):
            sim = build_sim(model if model is not None else state.model, meta["artifacts"])
            sim.load_encodings(self._path(rec.name, "encodings.json"), freeze=False, strict=False)
            with open(self._path(rec.name, "frozen.json")) as f:
                frozen = set(json.load(f))
            for n, q in sim.quantizers().items():
                q.frozen = n in frozen
        return Outcome(rec.score, model, sim, meta["artifacts"], rec.message, meta["candidate"])


def _dump(obj, path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def _atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)

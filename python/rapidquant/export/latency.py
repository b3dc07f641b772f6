"""Latency of an exported model in onnxruntime, and of its float twin: whether the
quantized file is faster on this machine, told before anyone deploys it.

Measured on the machine that runs the measurement (CPU execution provider, default graph
optimizations, a fixed thread count, median of repeated runs on the dummy input): it says
what onnxruntime does with the QDQ graph here, not what a phone NPU will do with it.
"""
from __future__ import annotations

import statistics
import time
from rapidquant.batches import model_args
from rapidquant.export.runtime import OnnxRuntimeModule


def _session_run(path: str, dummy_input, n_inputs, threads: int):
    """A no-argument callable running ``path`` once on the dummy input (default graph
    optimizations, ``threads`` intra-op threads)."""
    module = OnnxRuntimeModule(path, threads=threads)
    feeds = module.feeds(*model_args(dummy_input, n_inputs))
    return lambda: module.session.run(None, feeds)


def _median_ms(run, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def float_and_quantized(sim, dummy_input, quantized_onnx: str, folder: str, *, threads: int = 1,
                        repeats: int = 30) -> dict:
    """Latency of the quantized file and of the same sim exported with every quantizer off
    (the float model through the same exporter), measured in alternating rounds (load
    changes hit both). Plain data: ms figures, the ratio, the settings."""
    with sim.disabled():
        ref = sim.export(folder, dummy_input, "float_reference", overwrite=True)
    if repeats < 1 or threads < 1:
        raise ValueError(f"repeats and threads must be >= 1 (got {repeats}, {threads})")
    run_q = _session_run(quantized_onnx, dummy_input, sim.n_inputs, threads)
    run_f = _session_run(ref.onnx, dummy_input, sim.n_inputs, threads)
    q, f = [], []
    for _ in range(3):  # interleaved rounds; the median of the round medians
        q.append(_median_ms(run_q, repeats))
        f.append(_median_ms(run_f, repeats))
    q_ms, f_ms = statistics.median(q), statistics.median(f)
    return {"quantized_ms": q_ms, "float_ms": f_ms, "speedup": f_ms / q_ms, "threads": threads,
            "runs": 3 * repeats, "float_onnx": ref.onnx}

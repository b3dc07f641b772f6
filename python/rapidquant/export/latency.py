"""Latency of an exported model in onnxruntime, and of its float twin: whether the
quantized file is faster on this machine, told before anyone deploys it.

Measured on the machine that runs the measurement (CPU execution provider, default graph
optimizations, a fixed thread count, median of repeated runs on the dummy input): it says
what onnxruntime does with the QDQ graph here, not what a phone NPU will do with it.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from rapidquant.batches import model_args
from rapidquant.export.runtime import OnnxRuntimeModule


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    runs: int
    threads: int


def measure(path: str, dummy_input, n_inputs: int | None = None, *, threads: int = 1, repeats: int = 30,
            warmup: int = 3) -> Latency:
    """Wall time of one onnxruntime run of ``path`` on ``dummy_input`` (default session options)."""
    if repeats < 1 or threads < 1:
        raise ValueError(f"repeats and threads must be >= 1 (got {repeats}, {threads})")
    module = OnnxRuntimeModule(path, threads=threads)
    feeds = module.feeds(*model_args(dummy_input, n_inputs))
    for _ in range(warmup):
        module.session.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        module.session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Latency(statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))], repeats, threads)


def float_and_quantized(sim, dummy_input, quantized_onnx: str, folder: str, *, threads: int = 1,
                        repeats: int = 30) -> dict:
    """Latency of the quantized file and of the same sim exported with every quantizer off
    (the float model through the same exporter), measured alternately (load changes hit
    both). Plain data: ms figures, the ratio, the settings."""
    with sim.disabled():
        ref = sim.export(folder, dummy_input, "float_reference", overwrite=True)
    q, f = [], []
    for _ in range(3):  # interleaved rounds; the median of the round medians
        q.append(measure(quantized_onnx, dummy_input, sim.n_inputs, threads=threads, repeats=repeats))
        f.append(measure(ref.onnx, dummy_input, sim.n_inputs, threads=threads, repeats=repeats))
    q_ms = statistics.median(r.median_ms for r in q)
    f_ms = statistics.median(r.median_ms for r in f)
    return {"quantized_ms": q_ms, "float_ms": f_ms, "speedup": f_ms / q_ms, "threads": threads,
            "runs": 3 * repeats, "float_onnx": ref.onnx}

"""Latency of an exported model in onnxruntime, and of its float twin: whether the
quantized file is faster on this machine, told before anyone deploys it.

Measured on the machine that runs the measurement (CPU execution provider, default graph
optimizations, a fixed thread count, median of repeated runs on the dummy input): it says
what onnxruntime does with the QDQ graph here, not what a phone NPU will do with it.
"""
from __future__ import annotations

import os
import statistics
import time
from rapidquant.batches import model_args
from rapidquant.export.float_twin import write_float_twin
from rapidquant.export.runtime import OnnxRuntimeModule


def session_runner(path: str, dummy_input, n_inputs: int, threads: int):
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


ROUNDS = 3  # interleaved rounds per measurement


def median_latencies(runs: dict, *, repeats: int = 30, rounds: int = ROUNDS) -> dict:
    """Median milliseconds per call of each named callable, measured in interleaved rounds (a
    load change hits all of them): the median of the per-round medians."""
    if repeats < 1 or rounds < 1:
        raise ValueError(f"repeats and rounds must be >= 1 (got {repeats}, {rounds})")
    per_round = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            per_round[name].append(_median_ms(run, repeats))
    return {name: statistics.median(ms) for name, ms in per_round.items()}


def float_reference(sim, dummy_input, quantized_onnx: str, folder: str) -> str:
    """The float model as a file beside the quantized one: the quantized file with its
    quantization undone (export/float_twin.py), or where that cannot be done the same sim
    exported with every quantizer off. Written to ``folder``; returns its path."""
    path = os.path.join(folder, "float_reference.onnx")
    os.makedirs(folder, exist_ok=True)
    if write_float_twin(quantized_onnx, path):
        return path
    with sim.disabled():
        return sim.export(folder, dummy_input, "float_reference", overwrite=True).onnx


def against_float(sim, dummy_input, files: dict, folder: str, *, threads: int = 1, repeats: int = 30) -> dict:
    """{name: ms} for each exported file in ``files`` ({name: path}) and, under "float", for
    the float twin of the first (``float_reference``), all measured in the same interleaved
    rounds."""
    if repeats < 1 or threads < 1:
        raise ValueError(f"repeats and threads must be >= 1 (got {repeats}, {threads})")
    ref = float_reference(sim, dummy_input, next(iter(files.values())), folder)
    runs = {name: session_runner(path, dummy_input, sim.n_inputs, threads)
            for name, path in {"float": ref, **files}.items()}
    return median_latencies(runs, repeats=repeats)


def float_and_quantized(sim, dummy_input, quantized_onnx: str, folder: str, *, threads: int = 1,
                        repeats: int = 30) -> dict:
    """Latency of the quantized file and of its float twin (``against_float``). Plain data:
    ms figures, the ratio, the settings."""
    ms = against_float(sim, dummy_input, {"quantized": quantized_onnx}, folder, threads=threads, repeats=repeats)
    return {"quantized_ms": ms["quantized"], "float_ms": ms["float"], "speedup": ms["float"] / ms["quantized"],
            "threads": threads, "runs": ROUNDS * repeats, "float_onnx": os.path.join(folder, "float_reference.onnx")}

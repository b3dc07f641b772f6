"""Benchmark helpers: interleaved timing, bandwidth, markdown + CSV tables."""
from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Case:
    name: str
    fn: callable
    nbytes: int               # bytes read + written by one call
    baseline: str | None = None   # name of the case this one is compared with
    times: list = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def run_interleaved(cases: list[Case], device: str, rounds: int = 15, warmup: int = 2,
                    min_time: float = 0.02) -> None:
    """Time every case once per round, round-robin, so load changes hit all equally."""
    for c in cases:
        for _ in range(warmup):
            c.fn()
    sync(device)
    inner = {}
    for c in cases:  # pick a repeat count per case so one sample lasts >= min_time
        t0 = time.perf_counter()
        c.fn()
        sync(device)
        dt = max(time.perf_counter() - t0, 1e-7)
        inner[c.name] = max(1, int(min_time / dt))
    for _ in range(rounds):
        for c in cases:
            n = inner[c.name]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                c.fn()
            sync(device)
            c.times.append((time.perf_counter() - t0) / n)


def machine_line(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (f"{platform.processor() or platform.machine()}{cpu_isa()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch/OpenMP threads (torch {torch.__version__})")


def cpu_isa() -> str:
    """' (AVX2, no VNNI)' and the like: onnxruntime's integer kernels round and saturate
    differently with and without VNNI, so parity figures depend on it."""
    try:
        flags = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split())
    except (OSError, StopIteration):
        return ""
    vec = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    vnni = "VNNI" if flags & {"avx512_vnni", "avx_vnni"} else "no VNNI"
    return f" ({vec}, {vnni})"


def write_table(rows: list[dict], path_stem: str, title: str) -> str:
    os.makedirs(os.path.dirname(path_stem) or ".", exist_ok=True)
    cols = list(rows[0])
    with open(path_stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    md = "\n".join(lines) + "\n"
    with open(path_stem + ".md", "w") as f:
        f.write(md)
    return md

"""Rows of the suite's table, and the optional AIMET columns beside them."""
from __future__ import annotations

import time

from rapidquant.memory import peak_rss_mb

ROWS: list[dict] = []


def peak_mb() -> int:
    """The process's peak so far (AutoQuant restarts the kernel's count per stage on Linux,
    which getrusage reads too; peak_rss_mb remembers the process's)."""
    peak = peak_rss_mb()
    return 0 if peak is None else int(peak)


def row(case, config, score, fp32, seconds, notes="", ort=None, aimet=None):
    """Add one table row; `aimet` is (score, seconds) or a string saying why it is missing."""
    r = {"case": case, "configuration": config, "score": f"{score:.4f}", "drop": f"{fp32 - score:+.4f}",
         "onnxruntime score": "" if ort is None else f"{ort:.4f}", "time (s)": f"{seconds:.1f}",
         "aimet score": "", "aimet time (s)": "", "peak RSS so far (MB)": peak_mb(), "notes": notes}
    if isinstance(aimet, tuple):
        r["aimet score"], r["aimet time (s)"] = f"{aimet[0]:.4f}", f"{aimet[1]:.1f}"
    elif aimet:
        r["aimet score"] = aimet
    ROWS.append(r)
    side = f" | aimet {r['aimet score']}" + (f" {r['aimet time (s)']}s" if isinstance(aimet, tuple) else "")
    side = side if aimet else ""
    ort_s = f" ort {ort:.4f}" if ort is not None else ""
    print(f"  {case:18s} {config:46s} {score:.4f} ({fp32 - score:+.4f}) {seconds:6.1f}s{ort_s}{side} {notes}",
          flush=True)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0

    @property
    def now(self) -> float:
        return time.perf_counter() - self.t0

"""Process memory: the peak resident size (per stage, on Linux), handing the C heap's free
pages back to the OS, and keeping Python's cycle collector off the objects a run found there.

glibc keeps freed heap pages for reuse, so after a phase that allocated and freed hundreds of
MB in pieces (a layer-by-layer pass over ImageNet maps) the process's resident size stays at
that phase's peak, and the next phase's allocations add to it.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import sys

_PEAK_BEFORE_WINDOWS = [0.0]  # the process's peak (MiB) as it was when a window reset the kernel's


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far in MiB (2**20 bytes); None where the OS does not say."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
    return max(peak, _PEAK_BEFORE_WINDOWS[0])


def start_peak_window() -> bool:
    """Restart the kernel's peak-RSS count (Linux), so that window_peak_rss_mb() is the peak
    since now. The kernel's count is also what getrusage's ru_maxrss reads: it falls to the
    current RSS here (peak_rss_mb() remembers the process's peak). False where the OS cannot."""
    before = peak_rss_mb() or 0.0
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    _PEAK_BEFORE_WINDOWS[0] = before
    return True


def window_peak_rss_mb(started: bool) -> float | None:
    """Peak resident memory (MiB) since start_peak_window(), or the process's peak so far when
    that could not start a window."""
    if started:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
    return peak_rss_mb()


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, loaded once; None elsewhere (not Linux, or musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc keeps what was freed, so the next
    phase would start from the last one's peak). A no-op where the C library is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def old_objects_frozen():
    """Python's cycle collector leaves the objects that exist on entry alone until exit
    (``gc.freeze``): a full collection then scans only what the run made. A process that has
    loaded torch, onnx and onnxruntime holds 0.5-0.9 million tracked objects, and each full
    collection during an AutoQuant run scanned them all (several tenths of a second on this
    project's 2-core machine). The young generations are collected first, so that recent
    garbage is not kept; older garbage cycles, and old objects that become cyclic garbage
    during the run, wait until exit, when everything goes back to the collector
    (``gc.unfreeze``) and is collected as before. The freeze is process-wide (other threads'
    old objects too). A process that froze objects itself, or has the collector off, is left
    as it is; one that freezes objects during the run has them unfrozen at its end."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.collect(1)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()

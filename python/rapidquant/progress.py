"""Progress bars for long loops (tqdm when installed and stderr is a terminal or forced)."""
from __future__ import annotations

import os
import sys


def progress(it, total=None, desc="", enabled=True):
    if not enabled or os.environ.get("RAPIDQUANT_PROGRESS", "1") == "0":
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, desc=desc, file=sys.stderr, leave=False,
                disable=None if os.environ.get("RAPIDQUANT_PROGRESS") != "force" else False)

"""The real-model suite's smallest case end to end (accuracy regressions fail CI)."""
import os
import subprocess
import sys

import pytest

SUITE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "run_suite.py")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SUITE), reason="bench/run_suite.py is not next to the tests")
def test_quick_suite_digits_case(tmp_path):
    proc = subprocess.run([sys.executable, SUITE, "--quick", "--cases", "digits", "--threads", "2", "--no-aimet",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "determinism check: identical" in out
    aq = [line for line in out.splitlines() if "AutoQuant" in line and "met=" in line and line.startswith("  ")]
    assert len(aq) == 2 and all("met=True" in line for line in aq), aq
    assert (tmp_path / "suite.md").exists() and (tmp_path / "suite.csv").exists()

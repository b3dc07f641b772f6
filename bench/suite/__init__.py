"""The real-model suite's cases (bench/run_suite.py drives them)."""

"""Benchmarks behind the experiments/bench_*.py binaries (they print numbers; tests never time)."""

"""Benchmarks against stock vLLM: scenarios (pure), server processes, the harness."""

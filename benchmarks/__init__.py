"""Benchmarks: speed and cost measured side by side, reported as ratios (benchmarks/README.md).

Run each script as a module from the repository root, e.g. ``.venv/bin/python -m benchmarks.bench_sampler``;
``benchmarks.common`` holds what they share and ``benchmarks.up`` the stack they run against.
"""

"""Benchmarks of the NSA kernels, layer, context parallelism and training speed.

Run from the repository root as modules, e.g. `python -m benchmarks.bench_attention`. Results go to
benchmarks/results/ as `<benchmark>_<gpu>[_<variant>].{json,md,png}` (see recording.py).
The library (megatron_nsa, nsa_kernels) never imports this package.
"""

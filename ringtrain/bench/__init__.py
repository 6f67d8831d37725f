"""Benchmarks, not the core: every `ringtrain bench-*` command and the Gloo and MPI baselines
they measure against. Imported only when a benchmark command runs.

May import: anything in ringtrain.
"""

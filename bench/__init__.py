"""Benchmarks of the audit export: throughput, memory and statement costs on generated data.

Run ``make bench`` or ``python -m bench.run --help``; BENCHMARKS.md records the figures.
"""

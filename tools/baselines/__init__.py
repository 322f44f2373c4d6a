"""Baselines the benchmarks compare against, written outside the package (nothing in it imports them)."""

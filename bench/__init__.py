"""Benchmarks: each prints ours next to a reference measured in the same run."""

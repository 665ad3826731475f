"""Benchmarks: commands that measure speed and memory (docs/benchmarks.md); not part of the library."""

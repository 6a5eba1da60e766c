"""Benchmarks and hardware checks, run from the repository root (``python -m bench.<name>``;
``python bench/<name>.py`` works too). Not installed with the library: they measure it."""

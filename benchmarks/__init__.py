"""Benchmarks of the serving stack: run each module with ``python -m benchmarks.<name> --help``."""

"""Helpers for tests and benchmarks: tiny checkpoints in each family's published format."""

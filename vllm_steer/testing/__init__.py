"""Fixtures shared by tests and benchmarks: tiny models, test vectors, engines."""

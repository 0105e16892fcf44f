"""Tiny models built in code (no downloads) for tests, benchmarks and offline demos."""

"""Benchmark harness: fake upstream, load generator, orchestration (see bench/README.md)."""

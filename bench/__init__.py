"""Benchmarks: figures, not pass/fail tests (see ARCHITECTURE.md, "bench/")."""

"""Benchmarks of each stage against the hardware's limits and against peer libraries (`pipeline bench`)."""

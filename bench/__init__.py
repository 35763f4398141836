"""Benchmarks that write reports to bench/results/ (NAME.md with tables and PNG plots,
NAME.json with every figure under a stable key)."""

"""Benchmarks: workloads timed per engine, results as data (JSON), tables and plots."""

"""Benchmarks: each prints a table and writes bench/results/*.json (a plot where a picture helps); never tests."""

"""Benchmarks that compare llmos against a peer in one run."""

"""Metrics and logs: how the system reports what it is doing."""

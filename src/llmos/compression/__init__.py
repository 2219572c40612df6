"""Compression: quantization (and later pruning and distillation) producing child versions with a report."""

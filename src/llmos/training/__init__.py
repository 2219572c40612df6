"""Training: optimizers and schedules, a character tokenizer and small language models trained from scratch.

Contract: the subpackage imports nothing from the service or interface layers (registry, runtime, jobs, api, cli,
sdk); it works on plain texts, rows, directories and torch modules, so jobs and the SDK can drive it. Import the
modules directly (``llmos.training.optim``, ``llmos.training.charset``, ``llmos.training.scratch``); this package
file re-exports nothing so that importing it stays cheap.
"""

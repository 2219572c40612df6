"""Ollama's native HTTP API (``/api/...``), as the official ``ollama`` clients speak it."""

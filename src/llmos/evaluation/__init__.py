"""Evaluation: metrics of a registered model measured through the llmos engine (perplexity, ...)."""

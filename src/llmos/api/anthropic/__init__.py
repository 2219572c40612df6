"""Anthropic's Messages API (``/v1/messages``), served by the same engine as every other surface."""

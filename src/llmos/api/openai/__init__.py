"""The OpenAI API: chat and text completions, tool calls, embeddings, models (``/v1``)."""

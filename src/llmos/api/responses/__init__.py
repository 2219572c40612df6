"""OpenAI's Responses API (``/v1/responses``): request shapes, the routes, and the per-tenant response store."""

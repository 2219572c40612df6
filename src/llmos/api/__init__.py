"""The HTTP API: an OpenAI-compatible surface and admin routes, thin adapters over the runtime and registry."""

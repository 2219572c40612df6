"""Identity, permission, quotas, usage and audit: who may do what, how much, and what they did."""

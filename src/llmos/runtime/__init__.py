"""Model instances: loading registry versions onto a backend and engine, and keeping them resident."""

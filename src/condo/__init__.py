"""condo: a simple, idempotent supervisor for Docker containers, on Trio."""

__version__ = "0.1.0"

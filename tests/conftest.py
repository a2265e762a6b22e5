"""Shared fixtures. Integration tests need the real parts that scripts/test-env starts; when one
is missing they fail (never skip), so a green run always means the real thing was exercised."""

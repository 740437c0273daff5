"""Helpers for testing metarl and for dry runs without external services."""

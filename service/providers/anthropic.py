"""Anthropic Messages API through the official SDK (placeholder until the routing issue)."""

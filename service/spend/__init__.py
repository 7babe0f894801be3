"""Spend accounting (work in progress)."""

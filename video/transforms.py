"""Video: transforms (being written)."""

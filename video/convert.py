"""Video: convert (being written)."""

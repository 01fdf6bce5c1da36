"""Video: data (being written)."""

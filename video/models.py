"""Video: models (being written)."""
